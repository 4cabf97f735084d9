"""AnnData validation, registration and minibatching for the pybivi models.

The model classes never read an AnnData directly: :func:`setup_anndata` checks the
user's data once and records where the counts live, a :class:`Registry` remembers
what the model was trained on (genes, labels, reference libraries), and a
:class:`CellData` turns rows of an AnnData into minibatch dictionaries.

Batch dictionaries (the contract every consumer relies on)
----------------------------------------------------------
``"x_nascent"``, ``"x_mature"``
    float tensors ``(B, G)`` of raw counts (``"x_nascent"`` absent for mature-only models).
``"library_nascent"``, ``"library_mature"``
    float tensors ``(B,)``: the observed per-species totals of each cell
    (``"library_nascent"`` absent for mature-only models).
``"label"``
    long tensor ``(B,)``: index into :attr:`Registry.labels` (controls included; ``-1``
    for a label the model never saw).
``"is_control"``
    bool tensor ``(B,)``.
``"index"``
    long tensor ``(B,)``: the row of each cell in its AnnData.
``"batch_index"``
    long tensor ``(B,)``: index into :attr:`Registry.batch_categories` (only when a
    ``batch_key`` was registered).
``"categorical_covariates"``
    long tensor ``(B, K)``: per registered categorical covariate, the index into its
    :attr:`Registry.categorical_covariate_categories` (only when some were registered).
``"continuous_covariates"``
    float tensor ``(B, C)``: the registered continuous covariates (only when some were
    registered).

Counts may be scipy sparse: they stay sparse in the AnnData and only the rows of
one minibatch are densified. They may also stay on disk (``anndata.read_h5ad(path,
backed="r")``, ``anndata.experimental.read_lazy`` or :func:`pybivi.storage.open_lazy`):
then :class:`CellData` keeps only labels, control flags and library sizes in memory and
reads the rows of a few blocks at a time (see :mod:`pybivi.storage`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from pybivi._covariates import (
    as_key_list,
    categorical_column,
    category_codes,
    continuous_column,
    covariate_arrays,
)
from pybivi.storage import (
    DEFAULT_BLOCK_SIZE,
    CountStore,
    obs_columns,
    obs_labels,
    remember_totals,
    shuffled_blocks,
    totals_of,
)

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
        store = _store(_layer(adata, layer), f"{name} counts ({where})", shape)
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
    shape = (adata.n_obs, adata.n_vars)
    reference = {"nascent": float("nan"), "mature": float("nan")}
    for name in ("mature", "nascent") if args["use_nascent"] else ("mature",):
        layer = args[f"{name}_layer"]
        store = _store(_layer(adata, layer), f"{name} counts", shape)
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


class CellData:
    """Rows of one AnnData as minibatch dictionaries (see the module docstring).

    Parameters
    ----------
    adata
        The AnnData; it must have the registry's genes. Its counts are validated
        unless ``check`` is false (the training AnnData was validated at setup).
    registry
        The model's registry: layers, labels and control labels are read from it.
    check
        Validate the counts of ``adata``.
    block_size
        Shuffled iteration cuts the rows into blocks of this many contiguous rows,
        shuffles the blocks, and shuffles the cells of ``load_blocks`` blocks at a time
        (cheap reads from disk). ``None`` shuffles single cells. Default: ``None`` when
        every count matrix is in memory, :data:`pybivi.storage.DEFAULT_BLOCK_SIZE` when
        one is on disk. The attribute may be changed later.
    load_blocks
        Blocks loaded (and their cells shuffled together) at a time.

    Attributes
    ----------
    n_cells : int
    library : dict of str to numpy.ndarray
        Per-species library sizes (float32).
    label : numpy.ndarray
        Index into the registry's labels (``-1``: unseen label or no labels).
    is_control : numpy.ndarray
    in_memory : bool
        Whether every count matrix is in memory.
    """

    def __init__(
        self,
        adata: Any,
        registry: Registry,
        check: bool = True,
        block_size: int | None | str = "auto",
        load_blocks: int = 8,
    ) -> None:
        registry.check_genes(adata)
        self.n_cells = int(adata.n_obs)
        shape = (adata.n_obs, adata.n_vars)
        self._stores: dict[str, CountStore] = {}
        self.library: dict[str, np.ndarray] = {}
        self._gene_totals: dict[str, np.ndarray] = {}
        species = [("mature", registry.mature_layer)]
        if registry.use_nascent:
            species.append(("nascent", registry.nascent_layer))
        for name, layer in species:
            store = _store(_layer(adata, layer), f"{name} counts", shape)
            self._stores[name] = store
            totals = totals_of(adata, layer, store, check)
            self.library[name] = totals.library.astype(np.float32)
            self._gene_totals[name] = totals.genes
        if check and any((lib <= 0).any() for lib in self.library.values()):
            raise ValueError("some cells have a zero library size; filter them out first")
        self.in_memory = all(store.in_memory for store in self._stores.values())
        if isinstance(block_size, str) and block_size == "auto":
            block_size = None if self.in_memory else DEFAULT_BLOCK_SIZE
        self.block_size = block_size
        if int(load_blocks) < 1:
            raise ValueError(f"load_blocks must be >= 1, got {load_blocks}")
        self.load_blocks = int(load_blocks)
        self.label = np.full(self.n_cells, -1, dtype=np.int64)
        self.is_control = np.zeros(self.n_cells, dtype=bool)
        key = registry.perturbation_key
        if key is not None:
            if key not in obs_columns(adata):
                raise KeyError(f"perturbation key {key!r} not found in adata.obs")
            labels = obs_labels(adata, key)
            lookup = {label: i for i, label in enumerate(registry.labels)}
            self.label = np.array([lookup.get(lab, -1) for lab in labels], dtype=np.int64)
            self.is_control = np.isin(labels, registry.control_labels)
        #: per-cell covariate codes and values (``batch_index``, ...), when registered
        self.covariates = covariate_arrays(adata, registry)

    def gene_totals(self) -> dict[str, np.ndarray]:
        """Each species' total count per gene (from the same pass as the library sizes)."""
        return {name: totals.copy() for name, totals in self._gene_totals.items()}

    @property
    def block_size(self) -> int | None:
        """Contiguous rows per shuffled block (``None``: single cells are shuffled)."""
        return self._block_size

    @block_size.setter
    def block_size(self, value: int | None) -> None:
        valid = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
        if value is not None and not valid:
            raise ValueError(f"block_size must be a positive integer or None, got {value!r}")
        self._block_size = None if value is None else int(value)

    def _rows(self, indices: np.ndarray) -> dict[str, Any]:
        return {name: store.read(indices) for name, store in self._stores.items()}

    def _to_batch(self, indices: np.ndarray, rows: dict[str, Any], device: Any) -> dict[str, Any]:
        out: dict[str, torch.Tensor] = {}
        for name, block in rows.items():
            block = block.toarray() if sp.issparse(block) else block
            out[f"x_{name}"] = torch.as_tensor(np.asarray(block, dtype=np.float32), device=device)
            out[f"library_{name}"] = torch.as_tensor(self.library[name][indices], device=device)
        out["label"] = torch.as_tensor(self.label[indices], device=device)
        out["is_control"] = torch.as_tensor(self.is_control[indices], device=device)
        out["index"] = torch.as_tensor(indices, device=device)
        for key, values in self.covariates.items():
            out[key] = torch.as_tensor(values[indices], device=device)
        return out

    def batch(self, indices: np.ndarray, device: torch.device | str = "cpu") -> dict[str, Any]:
        """The batch dictionary of the cells at rows ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        return self._to_batch(indices, self._rows(indices), device)

    def iterate(
        self,
        indices: np.ndarray | None = None,
        batch_size: int = 128,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        device: torch.device | str = "cpu",
        drop_singleton: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Yield batch dictionaries over ``indices`` (all cells by default).

        Shuffling follows :attr:`block_size` (single cells, or shuffled blocks of
        contiguous rows). ``drop_singleton`` drops a trailing batch of one cell, which
        batch normalisation cannot train on.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.arange(self.n_cells) if indices is None else np.asarray(indices, dtype=np.int64)
        if shuffle:
            rng = rng if rng is not None else np.random.default_rng()
            if self.block_size is None:
                order = rng.permutation(order)
            else:
                order = shuffled_blocks(order, int(self.block_size), self.load_blocks, rng)
        # On disk, the rows of several batches are read at once (few contiguous reads).
        cells = (self.block_size or DEFAULT_BLOCK_SIZE) * self.load_blocks
        window = len(order) if self.in_memory else batch_size * math.ceil(cells / batch_size)
        for first in range(0, len(order), max(window, 1)):
            part = order[first : first + window]
            loaded = None if self.in_memory else self._rows(part)
            for start in range(0, len(part), batch_size):
                chunk = part[start : start + batch_size]
                if drop_singleton and len(chunk) == 1 and len(order) > 1:
                    continue
                if loaded is None:
                    yield self.batch(chunk, device=device)
                else:
                    rows = {name: m[start : start + batch_size] for name, m in loaded.items()}
                    yield self._to_batch(chunk, rows, device)
