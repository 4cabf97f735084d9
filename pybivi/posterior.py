"""Posterior samples of a fitted model as an :class:`arviz.InferenceData`.

:func:`posterior` (bound as ``model.posterior(...)``) draws latents from the module's Pyro
guide for the chosen cells and replays its model on them: everything exported is a site of
the model (the latents and its ``pyro.deterministic`` sites), so a user's own guide, prior,
decoder or scheme is what the export shows:

* ``z`` (dims ``cell, z_latent``) and ``t`` (``cell, t_latent``; the model's ``salient``
  site, exactly 0 for controls);
* ``mean_nascent`` and ``mean_mature`` (``mu_N``, ``mu_M``) and every kinetic parameter of
  the model's reaction scheme, named by ``scheme.kinetic_param_names`` (bursty:
  ``burst_size``, ``splicing_rate`` = beta/k, ``degradation_rate`` = gamma/k), with dims
  ``library, cell, gene``. ``library="observed"`` decodes with each cell's own library;
  ``library="reference"`` with the median training library of each species
  (``model.registry.reference_library``), which is what groups are compared on.

A user-defined scheme exports its own parameter names with no change here. The other
groups are ``observed_data`` (the counts, under the Pyro site name ``x`` with a trailing
``species`` dim, or ``x_mature``), ``constant_data`` (per-species libraries, perturbation
labels, control flags, the ``groupby`` column, ``theta``) and optionally
``posterior_predictive`` (replicated counts from the model's likelihood, drawn with
:class:`pyro.infer.Predictive` given the same latent draws).

The sampling core, :func:`iter_draws`, works one minibatch at a time so that memory is
bounded by what the caller keeps; :func:`pooled_samples` is what :mod:`pybivi.tl.de` uses.
Both live in ``pybivi._draws`` with the rest of the core and are re-exported here; the
arrays and the InferenceData are assembled in ``pybivi._idata``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pybivi._draws import (
    LIBRARIES,
    gene_index,
    iter_draws,
    pooled_samples,
    quantity_names,
    trace_posterior,
)
from pybivi._draws import transform_batch_codes as transform_batch_codes  # a re-export
from pybivi._idata import DrawBuffers
from pybivi.storage import obs_columns, obs_labels

__all__ = [
    "posterior",
    "iter_draws",
    "pooled_samples",
    "trace_posterior",
    "quantity_names",
    "LIBRARIES",
]


def _adata_of(model: Any, adata: Any):
    adata = model.adata if adata is None else adata
    if adata is None:
        raise ValueError("the model holds no AnnData: pass adata=")
    return adata


def select_cells(
    adata: Any,
    indices: Sequence[int] | np.ndarray | None = None,
    groupby: str | None = None,
    groups: Sequence[str] | None = None,
    max_cells_per_group: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Rows of ``adata`` to draw for: ``indices``, or by group of ``obs[groupby]``.

    With ``groupby``, only cells of ``groups`` (all groups by default) are kept, at most
    ``max_cells_per_group`` of each (a seeded random subset).
    """
    rows = np.arange(adata.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= adata.n_obs):
        raise ValueError(f"indices must lie in [0, {adata.n_obs}), got {rows.min()}..{rows.max()}")
    if groupby is None:
        if groups is not None or max_cells_per_group is not None:
            raise ValueError("groups= and max_cells_per_group= need groupby=")
        return rows
    if groupby not in obs_columns(adata):
        columns = obs_columns(adata)
        raise KeyError(f"groupby column {groupby!r} not in adata.obs (columns: {columns})")
    labels = obs_labels(adata, groupby)[rows]
    wanted = np.unique(labels) if groups is None else [str(g) for g in groups]
    unknown = [g for g in wanted if g not in set(labels)]
    if unknown:
        raise ValueError(f"groups {unknown} not found in adata.obs[{groupby!r}]")
    rng = np.random.default_rng(seed)
    keep = []
    for g in wanted:
        members = rows[labels == g]
        if max_cells_per_group is not None and members.size > max_cells_per_group:
            members = rng.choice(members, size=max_cells_per_group, replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep))


def predictive_counts(model: Any, batch: dict, z, t, genes_idx) -> np.ndarray:
    """Replicated counts given the drawn latents, from the model's own likelihood site."""
    from pyro.infer import Predictive

    module = model.module
    samples = {"z": z}
    if t is not None:
        samples["t"] = t
    site = "x" if module.likelihood == "cme" else "x_mature"
    predictive = Predictive(module.model, posterior_samples=samples, return_sites=[site])
    counts = predictive(batch, 1.0, False)[site]
    return counts.index_select(2, torch.as_tensor(genes_idx, device=counts.device)).cpu().numpy()


def posterior(
    model: Any,
    adata: Any = None,
    indices: Sequence[int] | np.ndarray | None = None,
    n_samples: int = 25,
    *,
    groupby: str | None = None,
    groups: Sequence[str] | None = None,
    max_cells_per_group: int | None = None,
    quantities: Sequence[str] | None = None,
    libraries: Sequence[str] = LIBRARIES,
    genes: Sequence[str] | None = None,
    posterior_predictive: bool = False,
    batch_size: int = 128,
    seed: int = 0,
    transform_batch: Any = None,
):
    """Posterior draws as an :class:`arviz.InferenceData` (one chain of ``n_samples`` draws).

    Parameters
    ----------
    model
        A fitted pybivi model.
    adata
        AnnData to draw for (default: the training data); it must have the model's genes.
    indices
        Rows of ``adata`` (default: all cells).
    n_samples
        Draws per cell from the guide.
    groupby, groups, max_cells_per_group
        Select cells by an ``obs`` column: only ``groups`` of it, at most
        ``max_cells_per_group`` cells each (seeded); the column is exported in
        ``constant_data``.
    quantities
        Per cell-and-gene variables to export (default: ``mean_*`` and the scheme's
        kinetic parameters, see :func:`quantity_names`).
    libraries
        ``"observed"`` and/or ``"reference"`` (coordinates of the ``library`` dim).
    genes
        Gene names to export (default: all).
    posterior_predictive
        Also draw replicated counts for every draw (``posterior_predictive`` group).
    batch_size
        Cells per minibatch (bounds the working memory to one minibatch).
    seed
        Seed of the latent draws and of the replicated counts.
    transform_batch
        Models set up with ``batch_key``: decode the means and kinetic parameters as if
        every cell came from this batch, or average them over a list of batches (see
        :func:`iter_draws`); ``None``: each cell at its own batch. Replicated counts are
        always drawn at each cell's own batch.

    Returns
    -------
    arviz.InferenceData
        Size: each exported per-gene variable holds ``n_samples x len(libraries) x
        n_cells x n_genes`` float32 numbers (4 bytes each), the predictive counts
        ``n_samples x n_cells x n_genes x n_species``; ``z``/``t`` are small. For 1,000
        cells, 2,000 genes, 25 draws and the 5 bursty variables at 2 libraries that is
        2 GB: restrict ``genes``, ``quantities``, ``indices`` or ``n_samples`` as needed.

    Examples
    --------
    >>> idata = model.posterior(n_samples=10, genes=["GATA1"])   # doctest: +SKIP
    >>> idata.posterior["burst_size"].sel(gene="GATA1", library="reference")  # doctest: +SKIP
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    adata = _adata_of(model, adata)
    rows = select_cells(adata, indices, groupby, groups, max_cells_per_group, seed)
    if rows.size == 0:
        raise ValueError("no cells selected")
    names = tuple(quantities) if quantities is not None else quantity_names(model)
    gene_idx = gene_index(model, genes)
    module = model.module
    species = tuple(getattr(module, "species", ("nascent", "mature")))
    buffers = DrawBuffers(
        n_samples, libraries, names, species, rows.size, gene_idx, posterior_predictive
    )
    pos = 0
    draws_iter = iter_draws(
        model,
        rows,
        n_samples,
        quantities=names,
        libraries=libraries,
        genes=genes,
        adata=adata,
        batch_size=batch_size,
        seed=seed,
        transform_batch=transform_batch,
    )
    with contextlib.ExitStack() as stack:
        if posterior_predictive:
            stack.enter_context(torch.random.fork_rng())
            torch.manual_seed(seed)
        for batch, draws in draws_iter:
            cells = slice(pos, pos + len(batch["index"]))
            buffers.add(cells, batch, draws)
            if posterior_predictive:
                counts = predictive_counts(model, batch, draws["z"], draws["t"], gene_idx)
                buffers.add_replicated(cells, counts)
            pos = cells.stop
    return buffers.to_inference_data(model, adata, rows, groupby)
