"""Where the differential tests read their draws: labels, group masks and pooled samples.

Shared by :mod:`pybivi.tl._de_pairs` (the pooled-pairs tests) and
:mod:`pybivi.tl._de_group` (the group-level tests); a model is drawn from, an
InferenceData is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pybivi.storage import obs_columns, obs_labels

__all__ = [
    "is_idata",
    "group_masks",
    "model_labels",
    "Sampler",
    "default_kinetic_params",
    "scheme_and_theta",
    "mature_group_means",
]


def is_idata(obj: Any) -> bool:
    return hasattr(obj, "posterior") and hasattr(obj, "constant_data")


def group_masks(
    labels: np.ndarray,
    is_control: np.ndarray | None,
    group: str | Sequence[str] | None,
    reference: str,
    groupby: str,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Boolean masks of the reference cells and of each tested group."""
    labels = np.asarray(labels).astype(str)
    if reference in set(labels):
        ref = labels == reference
    elif reference == "control" and is_control is not None:
        ref = np.asarray(is_control, dtype=bool)
    else:
        raise ValueError(
            f"reference {reference!r} is not a value of {groupby!r} "
            f"(values: {sorted(set(labels))[:10]})"
        )
    if not ref.any():
        raise ValueError(f"no reference cells ({reference!r})")
    if group is None:
        names = [g for g in np.unique(labels[~ref])]
    else:
        names = [group] if isinstance(group, str) else [str(g) for g in group]
    missing = [g for g in names if not np.any((labels == g) & ~ref)]
    if missing:
        raise ValueError(f"group(s) {missing} have no cells in {groupby!r} outside the reference")
    if not names:
        raise ValueError("no group to test against the reference")
    return ref, {g: (labels == g) & ~ref for g in names}


def model_labels(model: Any, groupby: str) -> tuple[np.ndarray, np.ndarray | None]:
    adata = model.adata
    if groupby not in obs_columns(adata):
        raise KeyError(
            f"groupby column {groupby!r} not in adata.obs (columns: {obs_columns(adata)})"
        )
    reg = model.registry
    ctrl = None
    if reg.perturbation_key is not None:
        ctrl = np.isin(obs_labels(adata, reg.perturbation_key), reg.control_labels)
    return obs_labels(adata, groupby), ctrl


def _idata_samples(idata: Any, name: str, mask: np.ndarray) -> np.ndarray:
    """Pooled ``(chain * draw * cells, gene)`` samples of ``name`` at the reference library."""
    da = idata.posterior[name]
    if "library" in da.dims:
        da = da.sel(library="reference" if "reference" in da["library"] else da["library"][0])
    da = da.isel(cell=np.flatnonzero(mask)).transpose("chain", "draw", "cell", "gene")
    return da.values.reshape(-1, da.sizes["gene"])


class Sampler:
    """Pooled posterior samples per group, from a model (drawn) or an InferenceData (read)."""

    def __init__(
        self,
        source: Any,
        groupby: str,
        n_samples: int,
        seed: int,
        batch_size: int,
        transform_batch: Any = None,
    ):
        self.source, self.n_samples, self.seed = source, n_samples, seed
        self.batch_size, self.transform_batch = batch_size, transform_batch
        if is_idata(source) and transform_batch is not None:
            raise ValueError(
                "transform_batch needs a model; an InferenceData holds the batch it was "
                "exported at (model.posterior(transform_batch=...))"
            )
        if is_idata(source):
            const = source.constant_data
            if groupby not in const:
                raise KeyError(
                    f"{groupby!r} not in the InferenceData's constant_data: export it with "
                    f"model.posterior(groupby={groupby!r}, ...)"
                )
            self.labels = const[groupby].values.astype(str)
            self.is_control = const["is_control"].values if "is_control" in const else None
            self.genes = [str(g) for g in source.posterior["gene"].values]
        else:
            self.labels, self.is_control = model_labels(source, groupby)
            self.genes = list(source.registry.var_names)

    def __call__(self, mask: np.ndarray, names: Sequence[str], salt: int) -> dict:
        if is_idata(self.source):
            out = {}
            for n in names:
                if n.startswith("rho_"):
                    const = self.source.constant_data
                    ref = float(const[f"reference_library_{n[4:]}"])
                    out[n] = _idata_samples(self.source, f"mean_{n[4:]}", mask) / ref
                else:
                    out[n] = _idata_samples(self.source, n, mask)
            return out
        from pybivi._draws import pooled_samples

        return pooled_samples(
            self.source,
            np.flatnonzero(mask),
            self.n_samples,
            names,
            library="reference",
            batch_size=self.batch_size,
            seed=self.seed + salt,
            transform_batch=self.transform_batch,
        )


def default_kinetic_params(source: Any) -> tuple[str, ...]:
    """Parameters tested by default: the paper's pair for the bursty scheme (burst size
    and relative degradation rate; beta/k = 1/theta is fixed per gene), otherwise every
    kinetic parameter. ``source`` is a model, an InferenceData or a reaction scheme."""
    if hasattr(source, "kinetic_param_names"):
        names = list(source.kinetic_param_names)
    elif is_idata(source):
        names = [v for v in source.posterior.data_vars if v not in ("z", "t")]
        names = [v for v in names if not v.startswith("mean_")]
    else:
        scheme = source.module.scheme
        if scheme is None:
            raise ValueError("kinetic DE needs a model with a reaction scheme (a CME likelihood)")
        names = list(scheme.kinetic_param_names)
    if {"burst_size", "degradation_rate"} <= set(names):
        return ("burst_size", "degradation_rate")
    return tuple(names)


def scheme_and_theta(source: Any, n_genes: int) -> tuple[Any, np.ndarray]:
    """The reaction scheme and per-gene theta of a model or an exported InferenceData.

    Raises
    ------
    ValueError
        The model has no reaction scheme, or the InferenceData lacks the scheme's name or
        ``theta`` (or its ``theta`` is not one per gene).
    """
    from pybivi import schemes

    if not is_idata(source):
        scheme = source.module.scheme
        if scheme is None:
            raise ValueError("kinetic DE needs a model with a reaction scheme (a CME likelihood)")
        return scheme, source.module.theta.detach().double().cpu().numpy()
    name = source.posterior.attrs.get("scheme")
    if name is None or "theta" not in source.constant_data:
        raise ValueError(
            "the InferenceData lacks the scheme name or theta: export it with "
            "model.posterior(...), which records both"
        )
    theta = np.asarray(source.constant_data["theta"].values, dtype=np.float64)
    if theta.shape != (n_genes,):
        raise ValueError(f"theta has shape {theta.shape}, expected ({n_genes},)")
    return schemes.get(str(name)), theta


def mature_group_means(model: Any, masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Mean observed mature count per gene of each group of cells (boolean ``masks``).

    One streamed pass over the cells of the groups (minibatches of the model's AnnData),
    so counts kept on disk are never loaded whole.
    """
    masks = [np.asarray(mask, dtype=bool) for mask in masks]
    rows = np.flatnonzero(np.any(np.stack(masks), axis=0))
    sums = [np.zeros(model.registry.n_genes) for _ in masks]
    for batch in model.make_batches(indices=rows, batch_size=1024):
        index = batch["index"].cpu().numpy()
        x = batch["x_mature"].double().cpu().numpy()
        for total, mask in zip(sums, masks, strict=True):
            total += x[mask[index]].sum(axis=0)
    return [total / max(int(mask.sum()), 1) for total, mask in zip(sums, masks, strict=True)]
