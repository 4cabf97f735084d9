"""AnnData validation, registration and minibatching for the pybivi models.

The model classes never read an AnnData directly: :func:`~pybivi.registry.setup_anndata`
checks the user's data once and records where the counts live, a
:class:`~pybivi.registry.Registry` remembers what the model was trained on (genes, labels,
reference libraries), and a :class:`CellData` turns rows of an AnnData into minibatch
dictionaries. The first two live in :mod:`pybivi.registry` and stay importable from here.

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

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from pybivi._covariates import covariate_arrays
from pybivi.registry import UNS_KEY, Registry, layer_store, make_registry, setup_anndata
from pybivi.storage import (
    DEFAULT_BLOCK_SIZE,
    CountStore,
    obs_columns,
    obs_labels,
    shuffled_blocks,
    totals_of,
)

# Registry, setup_anndata, make_registry and UNS_KEY moved to pybivi.registry; they are
# re-exported so that ``from pybivi.data import Registry`` keeps working.
__all__ = ["CellData", "Registry", "setup_anndata", "make_registry", "UNS_KEY"]


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
        self._stores: dict[str, CountStore] = {}
        self.library: dict[str, np.ndarray] = {}
        self._gene_totals: dict[str, np.ndarray] = {}
        species = [("mature", registry.mature_layer)]
        if registry.use_nascent:
            species.append(("nascent", registry.nascent_layer))
        for name, layer in species:
            store = layer_store(adata, layer, f"{name} counts")
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
