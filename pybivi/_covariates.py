"""Per-cell covariates of an AnnData: validation and codes (batch, categorical, continuous).

:func:`pybivi.registry.setup_anndata` registers the columns; :func:`covariate_arrays` turns
an AnnData's columns into the integer codes and values that minibatches carry, with a
clear error for a missing column, a missing value, a NaN or a category the model was not
set up with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "as_key_list",
    "category_codes",
    "categorical_column",
    "continuous_column",
    "covariate_arrays",
]


def as_key_list(keys: Sequence[str] | str | None, what: str) -> list[str]:
    """``obs`` column names as a list (one name, a list, or ``None``); no repeats."""
    if keys is None:
        return []
    if isinstance(keys, str):
        return [keys]
    keys = [str(k) for k in keys]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{what} lists a column twice: {keys}")
    return keys


def category_codes(values: np.ndarray, categories: Sequence[str], what: str) -> np.ndarray:
    """Indices of ``values`` in ``categories``; a value outside them is an error."""
    lookup = {c: i for i, c in enumerate(categories)}
    unseen = sorted({str(v) for v in values} - set(lookup))
    if unseen:
        raise ValueError(
            f"{what} has categories the model was not trained with: {unseen[:5]} "
            f"(known: {list(categories)[:10]}); a model can only embed or decode the "
            "categories it was set up with"
        )
    return np.array([lookup[str(v)] for v in values], dtype=np.int64)


def categorical_column(adata: Any, key: str, what: str) -> np.ndarray:
    """``obs[key]`` as strings; a missing column or value is an error."""
    if key not in adata.obs:
        raise KeyError(f"{what} {key!r} not found in adata.obs (columns: {list(adata.obs)})")
    column = adata.obs[key]
    if column.isna().any():
        raise ValueError(f"{what} adata.obs[{key!r}] has {int(column.isna().sum())} missing values")
    return column.astype(str).to_numpy()


def continuous_column(adata: Any, key: str) -> np.ndarray:
    """``obs[key]`` as float32; a missing column, non-numeric or non-finite value is an error."""
    what = "continuous covariate"
    if key not in adata.obs:
        raise KeyError(f"{what} {key!r} not found in adata.obs (columns: {list(adata.obs)})")
    column = adata.obs[key]
    if not np.issubdtype(column.dtype, np.number) or column.dtype == bool:
        raise ValueError(f"{what} adata.obs[{key!r}] must be numeric, got dtype {column.dtype}")
    values = column.to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = int((~np.isfinite(values)).sum())
        raise ValueError(f"{what} adata.obs[{key!r}] has {bad} NaN or infinite value(s)")
    return values.astype(np.float32)


def covariate_arrays(adata: Any, registry: Any) -> dict[str, np.ndarray]:
    """Per-cell covariate codes of ``adata`` under ``registry`` (a
    :class:`pybivi.registry.Registry`): the arrays of the minibatch dictionaries.

    Returns ``{"batch_index": (n,), "categorical_covariates": (n, K),
    "continuous_covariates": (n, C)}``, each only when registered.

    Raises
    ------
    KeyError
        A registered column is missing from ``adata.obs``.
    ValueError
        A category the model was not set up with, a missing value, or a NaN.
    """
    out: dict[str, np.ndarray] = {}
    if registry.batch_key is not None:
        values = categorical_column(adata, registry.batch_key, "batch key")
        what = f"adata.obs[{registry.batch_key!r}] (the batch)"
        out["batch_index"] = category_codes(values, registry.batch_categories, what)
    if registry.categorical_covariate_keys:
        codes = []
        pairs = zip(
            registry.categorical_covariate_keys,
            registry.categorical_covariate_categories,
            strict=True,
        )
        for key, categories in pairs:
            values = categorical_column(adata, key, "categorical covariate")
            codes.append(category_codes(values, categories, f"adata.obs[{key!r}]"))
        out["categorical_covariates"] = np.stack(codes, axis=1)
    if registry.continuous_covariate_keys:
        columns = [continuous_column(adata, k) for k in registry.continuous_covariate_keys]
        out["continuous_covariates"] = np.stack(columns, axis=1)
    return out

