"""Where a fitted bursty model's count pairs sit relative to the approximator's domain.

The shipped approximator of ``P(m | n)`` was trained on a box of kinetic parameters
(:data:`pybivi.cme.domain.BOX`) and states up to :data:`pybivi.cme.domain.STATE_CAP`.
Outside it, one of four rules takes over (:func:`pybivi.cme.regions.domain_regions`);
:func:`domain_table` evaluates the fitted model at its final parameters (posterior-mean
latents, observed libraries) on every cell and gene and reports the share of ``(n, m)``
pairs each rule handles. The counts are the same as the approximator's own tally, but
at the parameters the results come from, not summed over the whole optimisation.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "REGION_MEANING",
    "domain_counts",
    "domain_table",
    "applies",
    "quiet_backend",
    "after_training",
]

REGION_MEANING = {
    "small_burst": "b < 1e-3: the gene is treated as constitutive; mature counts are "
    "Poisson(b / gamma) independent of n (exact as b -> 0); b itself is not identified there",
    "clamped_b": "b > 1e3: the network sees b = 1e3; the kernels keep the pair's own moments, "
    "so means and variances are right but the shape of P(m | n) is extrapolated",
    "clamped_rates": "beta or gamma (per burst frequency) outside the training box: the "
    "network sees them clamped; means and variances right, shape extrapolated",
    "state_cap": "counts (or mean + 10 sd) above the state cap 2048: the network sees n "
    "capped; the likelihood of very highly expressed genes is extrapolated",
}
"""What each out-of-domain region means for the results."""


def applies(model: Any) -> bool:
    """Whether ``model`` evaluates the shipped bursty approximator (the only one with a domain)."""
    from pybivi.cme.approximator import BurstyConditional

    module = model.module
    scheme = getattr(module, "scheme", None)
    if getattr(module, "likelihood", None) != "cme" or getattr(scheme, "name", None) != "bursty":
        return False
    return isinstance(getattr(scheme, "backend", None), BurstyConditional)


@torch.no_grad()
def domain_counts(
    model: Any, adata: Any = None, indices: Any = None, batch_size: int = 512
) -> tuple[dict[str, np.ndarray], int]:
    """Per gene, how many cells' ``(n, m)`` pairs fall in each region.

    Parameters
    ----------
    model
        A bursty pybivi model (see :func:`applies`).
    adata, indices
        Cells to evaluate (default: every training cell).
    batch_size
        Cells per forward pass.

    Returns
    -------
    tuple
        ``({region: int array (genes,)}, n_cells)``; regions are those of
        :data:`pybivi.cme.regions.DOMAIN_REGIONS` plus ``"inside"``.
    """
    from pybivi.cme.regions import DOMAIN_REGIONS, domain_regions

    module = model.module
    was_training = module.training
    module.eval()
    totals = {r: np.zeros(model.registry.n_genes, dtype=np.int64) for r in DOMAIN_REGIONS}
    totals["inside"] = np.zeros(model.registry.n_genes, dtype=np.int64)
    n_cells = 0
    try:
        for batch in model.make_batches(adata, indices=indices, batch_size=batch_size):
            params = module.encode(batch)
            z = params["z"][0]
            t = None
            if "t" in params:
                t = torch.where(batch["is_control"].unsqueeze(-1), 0.0, params["t"][0])
            extra = {"covariates": module.covariates(batch)} if module.n_covariates else {}
            decoded = module.decode(
                z, t, batch.get("library_nascent"), batch["library_mature"], **extra
            )
            kin = module.scheme.kinetic_params(
                decoded["mu_nascent"], decoded["mu_mature"], module.theta
            )
            masks = domain_regions(
                batch["x_nascent"].cpu(),
                *(kin[k].cpu() for k in ("burst_size", "splicing_rate", "degradation_rate")),
            )
            for region, mask in masks.items():
                totals[region] += mask.sum(0).numpy().astype(np.int64)
            n_cells += batch["x_mature"].shape[0]
    finally:
        module.train(was_training)
    return totals, n_cells


def domain_table(
    model: Any, adata: Any = None, indices: Any = None, by: str = "region", batch_size: int = 512
) -> pd.DataFrame:
    """Share of ``(n, m)`` pairs outside the approximator's domain, by region or by gene.

    Parameters
    ----------
    model
        A fitted pybivi model. Models that do not use the shipped bursty approximator
        (other schemes, the exact backend, mature-only models) get an empty table.
    adata, indices
        Cells to evaluate (default: every training cell).
    by
        ``"region"``: one row per region (``small_burst``, ``clamped_b``,
        ``clamped_rates``, ``state_cap``) and ``outside`` (their sum), with columns
        ``pairs``, ``share`` (of all cell-gene pairs), ``genes`` (genes with at least
        one such pair) and ``meaning``. ``"gene"``: one row per gene, the share of its
        cells in each region and ``outside``.
    batch_size
        Cells per forward pass.

    Returns
    -------
    pandas.DataFrame
    """
    from pybivi.cme.regions import DOMAIN_REGIONS

    if by not in ("region", "gene"):
        raise ValueError(f"by must be 'region' or 'gene', got {by!r}")
    if not applies(model):
        cols = ["pairs", "share", "genes", "meaning"] if by == "region" else list(DOMAIN_REGIONS)
        return pd.DataFrame(columns=cols)
    counts, n_cells = domain_counts(model, adata, indices, batch_size)
    outside = sum(counts[r] for r in DOMAIN_REGIONS)
    if by == "gene":
        table = {r: counts[r] / max(n_cells, 1) for r in DOMAIN_REGIONS}
        table["outside"] = outside / max(n_cells, 1)
        return pd.DataFrame(table, index=pd.Index(model.registry.var_names, name="gene"))
    n_pairs = max(n_cells * model.registry.n_genes, 1)
    rows = [
        {
            "region": r,
            "pairs": int(counts[r].sum()),
            "share": float(counts[r].sum()) / n_pairs,
            "genes": int((counts[r] > 0).sum()),
            "meaning": REGION_MEANING[r],
        }
        for r in DOMAIN_REGIONS
    ]
    rows.append(
        {
            "region": "outside",
            "pairs": int(outside.sum()),
            "share": float(outside.sum()) / n_pairs,
            "genes": int((outside > 0).sum()),
            "meaning": "any of the above",
        }
    )
    return pd.DataFrame(rows).set_index("region")


def quiet_backend(module: Any):
    """Context in which the module's bursty approximator counts but does not warn.

    Models report the domain at their final parameters instead (:func:`after_training`).
    """
    backend = getattr(getattr(module, "scheme", None), "_backend", None)
    quiet = getattr(backend, "quiet", None)
    if quiet is None and getattr(getattr(module, "scheme", None), "name", None) == "bursty":
        backend = getattr(module.scheme, "backend", None)  # resolves the lazy backend
        quiet = getattr(backend, "quiet", None)
    return quiet() if callable(quiet) else contextlib.nullcontext()


#: cells evaluated by the out-of-domain check that ends every training run (a random sample
#: above this number)
AFTER_TRAINING_CELLS = 20_000


def after_training(model: Any) -> None:
    """Record the out-of-domain table at the final parameters; warn once per model.

    Stores :func:`domain_table` as ``model.training_diagnostics`` (the table at the end
    of the latest training run) and, the first time a model ends a training run with
    pairs outside the domain, gives a :class:`UserWarning` with the shares by region.
    Above :data:`AFTER_TRAINING_CELLS` cells the shares are estimated on that many cells
    drawn at random (fixed seed), so that the check costs a bounded pass on a large data
    set; ``model.diagnostics()`` evaluates every cell.
    """
    if not applies(model):
        return
    n_cells = int(model.registry.n_cells)
    indices = None
    if n_cells > AFTER_TRAINING_CELLS:
        rng = np.random.default_rng(0)
        # Sorted rows: on-disk data is then read in increasing order.
        indices = np.sort(rng.choice(n_cells, AFTER_TRAINING_CELLS, replace=False))
    table = domain_table(model, indices=indices)
    model.training_diagnostics = table
    share = float(table.loc["outside", "share"])
    if share > 0 and not getattr(model, "_domain_warned", False):
        model._domain_warned = True
        parts = ", ".join(
            f"{r} {100 * table.loc[r, 'share']:.3g}%"
            for r in table.index[:-1]
            if table.loc[r, "pairs"] > 0
        )
        warnings.warn(
            f"{type(model).__name__}: at the final parameters {100 * share:.3g}% of the (n, m) "
            f"pairs fall outside the bursty approximator's domain ({parts}); see "
            "model.diagnostics() and the user guide's 'approximator domain' section. "
            "This warning is given once per model.",
            UserWarning,
            stacklevel=3,
        )
