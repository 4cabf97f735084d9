"""What a model is set up with: :func:`setup_anndata` and the :class:`Registry`.

:func:`setup_anndata` checks the user's AnnData once and records in ``adata.uns["_pybivi"]``
where the counts, labels and covariates live; :func:`make_registry` turns that record into
a :class:`Registry`, which remembers what the model was trained on (genes, labels,
reference libraries, covariate categories) and is saved with it. The minibatches of the
registered data are :class:`pybivi.data.CellData`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from pybivi._covariates import (
    as_key_list,
    categorical_column,
    category_codes,
    continuous_column,
)
from pybivi.storage import CountStore, obs_columns, obs_labels, remember_totals, totals_of

__all__ = ["UNS_KEY", "Registry", "setup_anndata", "make_registry", "layer_store"]

UNS_KEY = "_pybivi"


@dataclasses.dataclass
class Registry:
    """What a model was set up and trained with.

    Attributes
    ----------
    n_cells, n_genes
        Shape of the training data.
    obs_names, var_names
        Cell and gene names of the training data.
    labels
        Sorted unique perturbation labels (controls included); ``label`` in a batch
        indexes this list. ``[]`` when no perturbation key was registered.
    control_labels
        The labels that mark control cells.
    perturbation_key
        ``obs`` column holding the labels, or ``None``.
    nascent_layer, mature_layer
        Layers of the counts (``None`` means ``adata.X``); ``use_nascent`` says
        whether the model reads nascent counts at all.
    reference_library
        ``{"nascent": float, "mature": float}``: the median per-species library of the
        training cells (``nan`` for a species the model does not use).
    batch_key, batch_categories
        ``obs`` column of the batch (``None``: no batch) and its sorted categories; the
        batch enters the networks one-hot (scVI's ``batch_key``).
    categorical_covariate_keys, categorical_covariate_categories
        ``obs`` columns of other categorical covariates and, per column, its sorted
        categories (each enters one-hot).
    continuous_covariate_keys
        ``obs`` columns of continuous covariates (each enters as its value).
    """

    n_cells: int
    n_genes: int
    obs_names: list[str]
    var_names: list[str]
    labels: list[str]
    control_labels: list[str]
    perturbation_key: str | None
    nascent_layer: str | None
    mature_layer: str | None
    use_nascent: bool
    reference_library: dict[str, float]
    # Defaults keep registries saved before covariates existed loadable.
    batch_key: str | None = None
    batch_categories: list[str] = dataclasses.field(default_factory=list)
    categorical_covariate_keys: list[str] = dataclasses.field(default_factory=list)
    categorical_covariate_categories: list[list[str]] = dataclasses.field(default_factory=list)
    continuous_covariate_keys: list[str] = dataclasses.field(default_factory=list)

    @property
    def n_batch(self) -> int:
        """Number of batches (0 without a ``batch_key``)."""
        return len(self.batch_categories)

    @property
    def has_covariates(self) -> bool:
        """Whether a batch or any covariate was registered."""
        return bool(
            self.batch_key or self.categorical_covariate_keys or self.continuous_covariate_keys
        )

    def covariate_sizes(self) -> dict[str, Any]:
        """Module arguments describing the covariates (empty without covariates)."""
        if not self.has_covariates:
            return {}
        return {
            "n_batch": self.n_batch,
            "n_cats_per_covariate": [len(c) for c in self.categorical_covariate_categories],
            "n_continuous_covariates": len(self.continuous_covariate_keys),
        }

    def batch_codes(self, values: Any) -> np.ndarray:
        """Batch categories (a category or a list of them) as indices into
        :attr:`batch_categories`.

        Raises
        ------
        ValueError
            No batch was registered, or a category is not one of the registered ones.
        """
        if self.batch_key is None:
            raise ValueError("the model was set up without batch_key: there is no batch to choose")
        values = [values] if isinstance(values, str) or np.ndim(values) == 0 else list(values)
        return category_codes(
            np.asarray([str(v) for v in values]), self.batch_categories, "transform_batch"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable copy."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Registry:
        """Inverse of :meth:`to_dict`."""
        return cls(**state)

    def check_genes(self, adata: Any) -> None:
        """Raise ``ValueError`` unless ``adata`` has exactly the registered genes, in order."""
        names = [str(v) for v in adata.var_names]
        if names != self.var_names:
            missing = sorted(set(self.var_names) - set(names))[:5]
            extra = sorted(set(names) - set(self.var_names))[:5]
            raise ValueError(
                f"the AnnData's genes differ from the {self.n_genes} genes the model was set up "
                f"with (it has {len(names)}; missing e.g. {missing}, unexpected e.g. {extra}; "
                "or the order differs). Subset it with adata[:, model.registry.var_names]."
            )


def _layer(adata: Any, layer: str | None) -> Any:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"layer {layer!r} not found in adata.layers (available: {list(adata.layers.keys())})"
        )
    return adata.layers[layer]


def _store(matrix: Any, what: str, shape: tuple[int, int]) -> CountStore:
    """A :class:`CountStore` of ``matrix``, after checking its shape."""
    if matrix is None:
        raise ValueError(f"{what} is empty (None)")
    if tuple(matrix.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(matrix.shape)}, expected {tuple(shape)}")
    return CountStore(matrix, what)


def _check_counts(matrix: Any, what: str, shape: tuple[int, int]) -> np.ndarray:
    """Library sizes of ``matrix``; ``ValueError`` unless it holds non-negative integer counts.

    One pass over the matrix (row blocks when it is on disk).
    """
    return _store(matrix, what, shape).scan(check=True)


def layer_store(adata: Any, layer: str | None, what: str) -> CountStore:
    """A :class:`~pybivi.storage.CountStore` of one layer of ``adata`` (``None``: ``adata.X``).

    Raises
    ------
    KeyError
        The layer is missing.
    ValueError
        The layer is empty or its shape is not ``adata``'s; ``what`` names it in the message.
    """
    return _store(_layer(adata, layer), what, (adata.n_obs, adata.n_vars))


def setup_anndata(
    adata: Any,
    perturbation_key: str | None = "perturbation",
    control_labels: Sequence[str] | str = ("NT",),
    nascent_layer: str | None = "unspliced",
    mature_layer: str | None = "spliced",
    use_nascent: bool = True,
    contrastive: bool = True,
    batch_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
) -> None:
    """Validate ``adata`` and record the setup in ``adata.uns["_pybivi"]``.

    Counts on disk are checked and their library sizes computed in one pass over blocks
    of rows per layer; nothing is loaded whole.

    Parameters
    ----------
    adata
        Cells x genes AnnData with raw counts (in memory, backed or lazy).
    perturbation_key
        ``obs`` column of perturbation labels. Required for contrastive models; for the
        others it may be ``None`` (or absent from ``obs``), and is then ignored.
    control_labels
        Label(s) that mark control cells (e.g. non-targeting guides).
    nascent_layer, mature_layer
        Layers holding nascent (unspliced) and mature (spliced) counts; ``None`` means
        ``adata.X``. The nascent layer is only read when ``use_nascent`` is true.
    use_nascent
        Whether the model reads nascent counts (false for mature-only models).
    contrastive
        Whether the model needs both control and perturbed cells.
    batch_key
        ``obs`` column of the batch (as scVI's ``batch_key``): one-hot into the
        encoders and the decoder, so that latents and decoded quantities are corrected
        for it.
    categorical_covariate_keys
        Other categorical ``obs`` columns, each injected one-hot like the batch.
    continuous_covariate_keys
        Numeric ``obs`` columns injected as values (e.g. percent mitochondrial counts).

    Raises
    ------
    KeyError
        A layer, the perturbation key or a covariate column is missing.
    ValueError
        Counts are negative, non-integer, NaN or of mismatched shapes; a cell has no
        counts in a species; a control label never occurs; no control or no perturbed
        cells; an on-disk layer is stored by columns (CSC); a categorical covariate has
        missing values; a continuous covariate is not numeric or has NaN or infinite values.
    """
    if isinstance(control_labels, str):
        control_labels = (control_labels,)
    control_labels = [str(c) for c in control_labels]
    shape = (adata.n_obs, adata.n_vars)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"the AnnData is empty (shape {shape})")
    species = [("mature", mature_layer)] + ([("nascent", nascent_layer)] if use_nascent else [])
    for name, layer in species:
        where = "adata.X" if layer is None else f"layer {layer!r}"
        store = layer_store(adata, layer, f"{name} counts ({where})")
        totals = store.scan(check=True)
        library = totals.library
        empty = np.flatnonzero(library <= 0)
        if empty.size:
            raise ValueError(
                f"{empty.size} cell(s) have no {name} counts (e.g. {adata.obs_names[empty[0]]!r}); "
                "their library size is zero. Filter them out first (e.g. sc.pp.filter_cells)."
            )
        if not store.in_memory:
            remember_totals(adata, layer, totals)
    key = perturbation_key
    if key is not None and key not in obs_columns(adata):
        if contrastive:
            raise KeyError(
                f"perturbation key {key!r} not found in adata.obs (columns: {obs_columns(adata)})"
            )
        key = None
    if key is not None:
        labels = obs_labels(adata, key)
        present = set(labels)
        absent = [c for c in control_labels if c not in present]
        if contrastive:
            if not control_labels:
                raise ValueError("no control cells: control_labels is empty")
            if absent:
                raise ValueError(
                    f"control label(s) {absent} never occur in adata.obs[{key!r}], so there "
                    f"are no such control cells (labels seen: {sorted(present)[:10]})"
                )
            if np.isin(labels, control_labels).all():
                raise ValueError("no perturbed cells: every cell carries a control label")
    categorical = as_key_list(categorical_covariate_keys, "categorical_covariate_keys")
    continuous = as_key_list(continuous_covariate_keys, "continuous_covariate_keys")
    repeated = sorted(
        set(categorical) & set(continuous) | ({batch_key} & set(categorical + continuous))
    )
    if repeated:
        raise ValueError(f"covariate column(s) {repeated} registered more than once")
    if batch_key is not None:
        categorical_column(adata, batch_key, "batch key")
    for k in categorical:
        categorical_column(adata, k, "categorical covariate")
    for k in continuous:
        continuous_column(adata, k)
    adata.uns[UNS_KEY] = {
        "batch_key": batch_key if batch_key is not None else "",
        "categorical_covariate_keys": categorical,
        "continuous_covariate_keys": continuous,
        "perturbation_key": key if key is not None else "",
        "control_labels": list(control_labels),
        "nascent_layer": nascent_layer if nascent_layer is not None else "",
        "mature_layer": mature_layer if mature_layer is not None else "",
        "use_nascent": bool(use_nascent),
    }


def _setup_args(adata: Any) -> dict[str, Any]:
    if UNS_KEY not in adata.uns:
        raise ValueError("the AnnData is not set up: call Model.setup_anndata(adata, ...) first")
    stored = dict(adata.uns[UNS_KEY])
    return {
        "perturbation_key": stored["perturbation_key"] or None,
        "control_labels": [str(c) for c in stored["control_labels"]],
        "nascent_layer": stored["nascent_layer"] or None,
        "mature_layer": stored["mature_layer"] or None,
        "use_nascent": bool(stored["use_nascent"]),
        "batch_key": stored.get("batch_key") or None,
        **{
            name: [str(k) for k in stored.get(name, [])]
            for name in ("categorical_covariate_keys", "continuous_covariate_keys")
        },
    }


def make_registry(adata: Any) -> Registry:
    """Build the :class:`Registry` of an AnnData prepared by :func:`setup_anndata`."""
    args = _setup_args(adata)
    key = args["perturbation_key"]
    labels = sorted(set(obs_labels(adata, key))) if key is not None else []
    reference = {"nascent": float("nan"), "mature": float("nan")}
    for name in ("mature", "nascent") if args["use_nascent"] else ("mature",):
        layer = args[f"{name}_layer"]
        store = layer_store(adata, layer, f"{name} counts")
        reference[name] = float(np.median(totals_of(adata, layer, store, check=False).library))
    batch_key, categorical = args["batch_key"], args["categorical_covariate_keys"]

    def categories(key: str, what: str) -> list[str]:
        return sorted(set(categorical_column(adata, key, what)))

    return Registry(
        n_cells=int(adata.n_obs),
        n_genes=int(adata.n_vars),
        obs_names=[str(o) for o in adata.obs_names],
        var_names=[str(v) for v in adata.var_names],
        labels=labels,
        control_labels=args["control_labels"],
        perturbation_key=key,
        nascent_layer=args["nascent_layer"],
        mature_layer=args["mature_layer"],
        use_nascent=args["use_nascent"],
        reference_library=reference,
        batch_key=batch_key,
        batch_categories=categories(batch_key, "batch key") if batch_key is not None else [],
        categorical_covariate_keys=categorical,
        categorical_covariate_categories=[
            categories(k, "categorical covariate") for k in categorical
        ],
        continuous_covariate_keys=args["continuous_covariate_keys"],
    )
