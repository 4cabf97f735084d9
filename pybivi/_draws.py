"""Posterior draws of a fitted model through its Pyro guide, one minibatch at a time.

The sampling core behind :mod:`pybivi.posterior` (which re-exports every public name
here and documents them): :func:`iter_draws` traces the module's guide with vectorised
particles and replays its model on the draws (:func:`trace_posterior`), reading the
model's sites; :func:`pooled_samples` pools a group's draws for :mod:`pybivi.tl.de`.
Memory is bounded by what the caller keeps of each minibatch. The export to an
:class:`arviz.InferenceData` (:func:`pybivi.posterior.posterior`) builds on it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine

__all__ = [
    "LIBRARIES",
    "gene_index",
    "iter_draws",
    "pooled_samples",
    "quantity_names",
    "trace_posterior",
    "transform_batch_codes",
]

LIBRARIES = ("observed", "reference")


@contextlib.contextmanager
def _evaluation(module: torch.nn.Module):
    """Eval mode (no dropout, running batch-norm statistics) and no autograd, restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def quantity_names(model: Any) -> tuple[str, ...]:
    """Per cell-and-gene quantities the model exports: means, then kinetic parameters."""
    module = model.module
    species = tuple(getattr(module, "species", ("nascent", "mature")))
    names = tuple(f"mean_{s}" for s in species)
    if module.scheme is not None and "nascent" in species:
        names += tuple(module.scheme.kinetic_param_names)
    return names


def gene_index(model: Any, genes: Sequence[str] | None) -> np.ndarray:
    """Positions of ``genes`` among the model's genes (all genes for ``None``).

    Raises
    ------
    KeyError
        A gene is not one of the model's.
    """
    var_names = list(model.registry.var_names)
    if genes is None:
        return np.arange(len(var_names))
    lookup = {g: i for i, g in enumerate(var_names)}
    missing = [g for g in genes if g not in lookup]
    if missing:
        raise KeyError(f"genes not in the model: {missing[:5]}")
    return np.array([lookup[g] for g in genes], dtype=np.int64)


def _rng_devices(module: torch.nn.Module) -> list[torch.device]:
    devices = {p.device for p in module.parameters() if p.device.type == "cuda"}
    return sorted(devices, key=str)


def _max_plate_nesting(module: Any, batch: dict[str, torch.Tensor]) -> int:
    """Plates the model and guide nest (the ``cells`` plate: 1), from one unvectorised run."""
    with poutine.block():
        guide_trace = poutine.trace(module.guide).get_trace(batch)
        model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(
            batch
        )
    dims = [
        -frame.dim
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def trace_posterior(
    module: Any, batch: dict[str, torch.Tensor], n_samples: int, nesting: int = 1
) -> poutine.Trace:
    """Trace of the model replayed on ``n_samples`` vectorised draws of the guide.

    The guide and the model run inside one outer ``pyro.plate`` of ``n_samples`` particles
    (left of the model's own ``nesting`` plates), so every latent and deterministic site
    has a leading sample axis. Draws use the global torch RNG: seed it (or fork it) around
    the call for reproducible, side-effect-free draws.
    """
    with pyro.plate("posterior_draws", n_samples, dim=-(nesting + 1)):
        guide_trace = poutine.trace(module.guide).get_trace(batch)
        return poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(batch)


def _site_name(quantity: str, library: str) -> str:
    """The model's site of a quantity at a library (``rho_*`` does not depend on it)."""
    if library == "observed" or quantity.startswith("rho_"):
        return quantity
    return f"{quantity}_reference"


def _site(trace: poutine.Trace, name: str, n_samples: int) -> torch.Tensor:
    value = trace.nodes[name]["value"]
    return value.expand(n_samples, *value.shape[-2:]) if value.dim() == 2 else value


def iter_draws(
    model: Any,
    indices: Sequence[int] | np.ndarray | None = None,
    n_samples: int = 1,
    *,
    quantities: Sequence[str] | None = None,
    libraries: Sequence[str] = LIBRARIES,
    genes: Sequence[str] | None = None,
    adata: Any = None,
    batch_size: int = 128,
    seed: int = 0,
    transform_batch: Any = None,
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Posterior draws, one minibatch of cells at a time.

    For each minibatch the module's guide is traced with ``n_samples`` vectorised particles
    and the model is replayed on its draws (:func:`trace_posterior`); the quantities are
    the model's deterministic sites, at the observed libraries and, for
    ``"reference"``, at ``model.registry.reference_library`` (passed to the model as the
    batch keys ``reference_library_<species>``).

    Parameters
    ----------
    model
        A fitted pybivi model (``module``, ``registry``, ``make_batches``).
    indices
        Rows of the AnnData to draw for (all cells by default).
    n_samples
        Draws per cell.
    quantities
        Per cell-and-gene quantities to decode (default :func:`quantity_names`); also
        accepted: ``"rho_nascent"``/``"rho_mature"`` (normalised expression).
    libraries
        Any of ``"observed"`` and ``"reference"``.
    genes
        Gene names to keep (all by default).
    adata
        Another AnnData with the model's genes (default: the training data).
    batch_size
        Cells per minibatch.
    seed
        Seed of the latent draws (the global RNG is untouched).
    transform_batch
        Models set up with ``batch_key``: decode every cell as if from this batch (a
        category), or average the decoded quantities over a list of batches (the same
        latent draws decoded at each); ``None`` decodes each cell at its own batch. The
        encoders always read each cell's own batch (scvi-tools' ``transform_batch``).

    Yields
    ------
    tuple
        ``(batch, draws)`` with ``draws["z"]``/``draws["t"]`` of shape ``(S, B, latent)``
        (``t`` is ``None`` without salient latents; 0 for controls) and
        ``draws[library][quantity]`` of shape ``(S, B, n_genes_kept)``.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    bad = [lib for lib in libraries if lib not in LIBRARIES]
    if bad:
        raise ValueError(f"libraries must be among {LIBRARIES}, got {bad}")
    module = model.module
    wanted = tuple(quantities) if quantities is not None else quantity_names(model)
    gene_idx = torch.as_tensor(gene_index(model, genes))
    ref = {f"reference_library_{s}": float(v) for s, v in model.registry.reference_library.items()}
    decode_batches = transform_batch_codes(model, transform_batch)
    gen = torch.Generator().manual_seed(int(seed))
    nesting = None
    with _evaluation(module):
        batches = model.make_batches(adata=adata, indices=indices, batch_size=batch_size)
        for batch in batches:
            traced = dict(batch)
            if "reference" in libraries:
                traced.update({k: torch.tensor(v) for k, v in ref.items()})
            # One seed per minibatch from the caller's seed; the global RNG is restored.
            batch_seed = int(torch.randint(2**62, (1,), generator=gen))
            per_batch = []
            first = nesting is None
            # Each decoding batch replays the same latent draws (same seed, same RNG use):
            # the average over batches is of the decoder alone, as scvi-tools'
            # transform_batch.
            for code in decode_batches:
                if code is not None:
                    traced["decode_batch_index"] = torch.tensor(code)
                with torch.random.fork_rng(devices=_rng_devices(module)):
                    torch.manual_seed(batch_seed)
                    if first:
                        nesting = _max_plate_nesting(module, traced)
                    trace = trace_posterior(module, traced, n_samples, nesting)
                draws = _trace_draws(trace, module, wanted, libraries, gene_idx, n_samples)
                per_batch.append(draws)
            yield batch, _average_draws(per_batch, libraries)


def transform_batch_codes(model: Any, transform_batch: Any) -> list[int | None]:
    """Batch indices to decode at: ``[None]`` (each cell's own batch) for ``None``.

    Raises
    ------
    ValueError
        ``transform_batch`` is given for a model without ``batch_key``, or names a batch
        the model was not set up with.
    """
    if transform_batch is None:
        return [None]
    codes = model.registry.batch_codes(transform_batch)
    if codes.size == 0:
        raise ValueError("transform_batch is an empty list")
    return [int(c) for c in codes]


def _trace_draws(
    trace: poutine.Trace,
    module: Any,
    wanted: Sequence[str],
    libraries: Sequence[str],
    gene_idx: torch.Tensor,
    n_samples: int,
) -> dict[str, Any]:
    """Latents and per-library quantities of one traced minibatch (see :func:`iter_draws`)."""
    sites = {name for name, site in trace.nodes.items() if site["type"] == "sample"}
    t = _site(trace, "salient", n_samples) if "salient" in sites else None
    draws: dict[str, Any] = {"z": _site(trace, "z", n_samples), "t": t}
    gi = gene_idx.to(draws["z"].device)
    for lib in libraries:
        names = {q: _site_name(q, lib) for q in wanted}
        missing = [q for q, name in names.items() if name not in sites]
        if missing:
            kinetic = getattr(module.scheme, "kinetic_param_names", ())
            available = sorted(n for n in sites if n.startswith(("mean_", "rho_")) or n in kinetic)
            raise KeyError(
                f"quantities {missing} are not available for this model "
                f"(available: {available})"
            )
        draws[lib] = {
            q: _site(trace, name, n_samples).index_select(-1, gi) for q, name in names.items()
        }
    return draws


def _average_draws(per_batch: list[dict[str, Any]], libraries: Sequence[str]) -> dict[str, Any]:
    """The quantities averaged over decoding batches (latents are shared)."""
    if len(per_batch) == 1:
        return per_batch[0]
    out = dict(per_batch[0])
    for lib in libraries:
        out[lib] = {
            q: torch.stack([d[lib][q] for d in per_batch]).mean(0) for q in per_batch[0][lib]
        }
    return out


def pooled_samples(
    model: Any,
    indices: Sequence[int] | np.ndarray,
    n_total: int,
    quantities: Sequence[str],
    *,
    library: str = "reference",
    genes: Sequence[str] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    transform_batch: Any = None,
) -> dict[str, np.ndarray]:
    """Posterior samples of a group of cells, pooled: ``{quantity: (n_total, n_genes)}``.

    ``transform_batch`` is as in :func:`iter_draws`.

    Each cell gets ``ceil(n_total / n_cells)`` draws (one draw each for a random subset of
    ``n_total`` cells when the group is larger), then ``n_total`` of the pooled draws
    are kept at random. Memory: about ``2 n_total x n_genes`` floats per quantity.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise ValueError("the group has no cells")
    rng = np.random.default_rng(seed)
    if indices.size > n_total:
        indices = np.sort(rng.choice(indices, size=n_total, replace=False))
    per_cell = math.ceil(n_total / indices.size)
    chunks: dict[str, list[np.ndarray]] = {q: [] for q in quantities}
    for _, draws in iter_draws(
        model,
        indices,
        per_cell,
        quantities=quantities,
        libraries=(library,),
        genes=genes,
        batch_size=batch_size,
        seed=seed,
        transform_batch=transform_batch,
    ):
        for q in quantities:
            v = draws[library][q]
            chunks[q].append(v.reshape(-1, v.shape[-1]).cpu().numpy())
    pooled = {q: np.concatenate(c, axis=0) for q, c in chunks.items()}
    keep = rng.choice(len(next(iter(pooled.values()))), size=n_total, replace=False)
    return {q: v[keep] for q, v in pooled.items()}
