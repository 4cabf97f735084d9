"""Row access to count matrices held in memory or on disk.

A :class:`CountStore` wraps one count matrix of an AnnData (``adata.X`` or a layer) and
reads rows of it without ever loading the whole matrix when it lives on disk:

* in memory: scipy sparse (kept as CSR) or a NumPy array;
* on disk: anndata's backed sparse datasets (``anndata.read_h5ad(path, backed="r")``
  for ``X``, :func:`open_lazy` for every layer), HDF5/zarr dense arrays, and the dask
  arrays of ``anndata.experimental.read_lazy``.

Reading a contiguous block of rows from disk costs about as much as reading a handful of
scattered rows (one HDF5 or zarr read per contiguous run), so on-disk rows are always
read as few contiguous runs (:meth:`CountStore.read`), and training shuffles blocks of
contiguous rows instead of single cells (see :mod:`pybivi.data`), as in scverse's
annbatch loader.

A sparse matrix stored by rows in anndata's layout (a group of ``data``, ``indices`` and
``indptr``) is read straight from those three arrays, with ``indptr`` kept in memory (4 or
8 bytes per cell): a read then costs two array reads, without the per-read overhead of
anndata's backed datasets, and scattered rows that fall in the same compressed chunk are
read together. The dask arrays of ``read_lazy`` are read the same way when they are the
untouched arrays ``read_lazy`` built (their on-disk group is found in the dask graph);
any other dask array is computed a whole number of its chunks at a time, with dask's
synchronous scheduler.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pybivi import _disk_arrays as disk

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "CountStore",
    "Totals",
    "check_count_values",
    "obs_columns",
    "obs_labels",
    "open_lazy",
    "remember_totals",
    "shuffled_blocks",
    "totals_of",
]

#: Contiguous rows per shuffled block for on-disk data (benchmarks/scale.py measures
#: the read cost per cell: 2048 rows amortise a read to a few microseconds per cell).
DEFAULT_BLOCK_SIZE = 2048
#: Rows per read when scanning a whole matrix (setup checks, library sizes).
SCAN_BLOCK_SIZE = 8192
class CountStore:
    """Rows of one count matrix, in memory or on disk.

    Parameters
    ----------
    matrix
        The matrix (see the module docstring for the kinds accepted).
    what
        How to name the matrix in error messages (e.g. ``"mature counts (layer 'spliced')"``).

    Raises
    ------
    TypeError
        The matrix is of a kind that cannot be read by rows.
    ValueError
        An on-disk sparse matrix is stored by columns (CSC): reading one cell would read
        the whole matrix.
    """

    def __init__(self, matrix: Any, what: str) -> None:
        if matrix is None:
            raise ValueError(f"{what} is empty (None)")
        self.what = what
        self.shape = tuple(int(s) for s in matrix.shape)
        self.in_memory = True
        if sp.issparse(matrix):
            # CSR makes row slicing cheap; dense stays dense (no copy for float32 input).
            self.matrix: Any = sp.csr_matrix(matrix)
        elif isinstance(matrix, np.ndarray):
            self.matrix = np.asarray(matrix)
        elif disk.is_sparse_dataset(matrix) or disk.is_disk_array(matrix) or disk.is_dask(matrix):
            meta = getattr(matrix, "_meta", None)  # a dask array's chunk type
            layout = getattr(meta if sp.issparse(meta) else matrix, "format", "csr")
            if layout == "csc":
                raise ValueError(
                    f"{what} is stored on disk by columns (CSC); reading cells needs rows. "
                    "Write it by rows first (e.g. adata.layers[name] = "
                    "adata.layers[name].tocsr() before adata.write_h5ad)."
                )
            self.matrix, self.in_memory = matrix, False
            # anndata's backed datasets pay a fixed cost per read (index validation) and
            # read_lazy's dask arrays one per chunk (the file reopened, indptr reread):
            # their stored arrays are read directly where they can be reached.
            self._csr = disk.csr_arrays(matrix) if layout == "csr" else None
            if self._csr is None and disk.is_dask(matrix):
                self._bounds = disk.dask_bounds(matrix)
        elif hasattr(matrix, "__array__"):
            self.matrix = np.asarray(matrix)
        else:
            raise TypeError(f"{what} has an unsupported type {type(matrix).__name__}")
        self.dtype = np.dtype(self.matrix.dtype)

    _csr: disk.CSRArrays | None = None
    #: where each chunk of a dask array read through dask starts (``None``: not one)
    _bounds: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        """Number of rows (cells)."""
        return self.shape[0]

    @property
    def reads_through(self) -> str:
        """How rows are read: ``"memory"``, ``"arrays"`` (a sparse matrix's stored
        arrays, directly), ``"dask"`` (whole chunks of a dask array, synchronously) or
        ``"slicing"`` (an HDF5 or zarr dense array or a backed dataset, sliced)."""
        if self.in_memory:
            return "memory"
        if self._csr is not None:
            return "arrays"
        return "dask" if self._bounds is not None else "slicing"

    def read_slice(self, start: int, stop: int) -> Any:
        """Rows ``start:stop`` in memory (scipy CSR or a NumPy array), one read."""
        if self._csr is not None:
            return self._csr.read_slice(start, stop)
        block = self.matrix[start:stop]
        if disk.is_dask(block):
            # The chunks are read one after another: dask's threads cost more than they
            # give on a few cores, and h5py runs one call at a time anyway.
            block = block.compute(scheduler="synchronous")
        return sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)

    def read(self, rows: np.ndarray) -> Any:
        """Rows ``rows`` (any order, repeats allowed) in memory, in that order.

        In memory this is plain indexing. On disk the distinct rows are read as few
        contiguous spans and reordered: rows less than ``disk.MAX_GAP`` apart share a span;
        so do rows of a sparse matrix read from its stored arrays that are less than a
        compressed chunk (or ``disk.MAX_GAP_ENTRIES`` uncompressed entries) apart; a dask
        array read through dask is read whole chunks at a time, each chunk once.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if self.in_memory:
            return self.matrix[rows]
        if rows.size == 0:
            return self.read_slice(0, 0)
        wanted, position = np.unique(rows, return_inverse=True)
        parts = []
        for start, stop, run in self._spans(wanted):
            block = self.read_slice(start, stop)
            parts.append(block[run - start])
        stacked = sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)
        return stacked[position]

    def _spans(self, wanted: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """``(start, stop, rows)``: the spans to read for ``wanted`` (sorted distinct)."""
        if self._csr is not None:
            return [(int(r[0]), int(r[-1]) + 1, r) for r in self._csr.runs(wanted)]
        if self._bounds is None or np.diff(self._bounds).max() > SCAN_BLOCK_SIZE:
            breaks = np.flatnonzero(np.diff(wanted) > disk.MAX_GAP) + 1
            return [(int(r[0]), int(r[-1]) + 1, r) for r in np.split(wanted, breaks)]
        # Whole chunks: read_lazy's tasks read a whole chunk for any row of it, so every
        # row wanted from a chunk comes from one read. Consecutive chunks share a read up
        # to SCAN_BLOCK_SIZE rows (larger chunks are sliced as above).
        bounds = self._bounds
        touched = np.unique(np.searchsorted(bounds, wanted, side="right") - 1)
        spans = []
        first = 0
        for i in range(1, len(touched) + 1):
            if (
                i == len(touched)
                or touched[i] != touched[i - 1] + 1
                or bounds[touched[i] + 1] - bounds[touched[first]] > SCAN_BLOCK_SIZE
            ):
                start, stop = int(bounds[touched[first]]), int(bounds[touched[i - 1] + 1])
                low, high = np.searchsorted(wanted, [start, stop])
                spans.append((start, stop, wanted[low:high]))
                first = i
        return spans

    def _aligned(self, block_size: int) -> int:
        """``block_size`` rounded down to whole dask chunks when read through dask.

        A block that ends inside a chunk has that chunk read again by the next block.
        """
        if self._bounds is None or len(self._bounds) < 3:
            return block_size
        sizes = np.diff(self._bounds)
        chunk = int(sizes[0])
        if chunk > block_size or not np.all(sizes[:-1] == chunk):
            return block_size
        return block_size // chunk * chunk

    def blocks(self, block_size: int | None = None) -> Iterator[tuple[int, Any]]:
        """``(start, rows)`` for consecutive blocks of ``block_size`` rows, in order.

        ``None``: :data:`SCAN_BLOCK_SIZE` rows, rounded to whole chunks for a dask array
        read through dask.
        """
        block_size = block_size or self._aligned(SCAN_BLOCK_SIZE)
        for start in range(0, self.n_rows, block_size):
            yield start, self.read_slice(start, min(start + block_size, self.n_rows))

    def scan(self, check: bool = True, block_size: int | None = None) -> Totals:
        """Per-row and per-column sums (float64), checking the counts on the way.

        One pass over the matrix: the whole of it when in memory, blocks of
        ``block_size`` rows (default :data:`SCAN_BLOCK_SIZE`, in whole chunks for a dask
        array read through dask) when on disk. The row sums are the cells' library
        sizes, the column sums the genes' total counts.

        Raises
        ------
        ValueError
            ``check`` is true and the counts are not finite non-negative integers.
        """
        if check:
            check_count_dtype(self.dtype, self.what)
        if self.in_memory:
            if check:
                values = self.matrix.data if sp.issparse(self.matrix) else self.matrix
                check_count_values(np.asarray(values), self.what)
            return Totals(
                np.asarray(self.matrix.sum(axis=1), dtype=np.float64).ravel(),
                np.asarray(self.matrix.sum(axis=0), dtype=np.float64).ravel(),
            )
        rows = np.empty(self.n_rows, dtype=np.float64)
        columns = np.zeros(self.shape[1], dtype=np.float64)
        for start, block in self.blocks(block_size):
            if check:
                check_count_values(block.data if sp.issparse(block) else block, self.what)
            rows[start : start + block.shape[0]] = np.asarray(block.sum(axis=1)).ravel()
            columns += np.asarray(block.sum(axis=0), dtype=np.float64).ravel()
        return Totals(rows, columns)


def check_count_dtype(dtype: np.dtype, what: str) -> None:
    """Raise ``ValueError`` unless ``dtype`` is numeric."""
    if not np.issubdtype(np.dtype(dtype), np.number):
        raise ValueError(f"{what} must be numeric, got dtype {dtype}")


def check_count_values(values: np.ndarray, what: str) -> None:
    """Raise ``ValueError`` unless ``values`` are finite non-negative integers."""
    values = np.asarray(values)
    check_count_dtype(values.dtype, what)
    if values.size == 0:
        return
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{what} contains NaN or infinite values; counts must be finite")
        if np.any(values != np.round(values)):
            raise ValueError(
                f"{what} contains non-integer values; pybivi needs raw counts, not normalised data"
            )
    if values.min() < 0:
        raise ValueError(f"{what} contains negative values; counts must be >= 0")


def open_lazy(path: str | Path) -> Any:
    """Open an ``.h5ad`` file or a ``.zarr`` store with every count matrix left on disk.

    ``obs``, ``var`` and ``uns`` are read into memory (small: one row per cell or gene);
    ``X`` and the layers stay on disk as anndata's backed sparse datasets (sparse
    matrices) or HDF5/zarr arrays (dense ones), read a block of rows at a time by pybivi.
    ``obsm``, ``varm``, ``obsp`` and ``varp`` are not opened. This needs nothing beyond
    anndata itself; ``anndata.experimental.read_lazy`` (which needs dask) works too.

    Parameters
    ----------
    path
        An ``.h5ad`` file or a zarr store written by ``adata.write_h5ad`` /
        ``adata.write_zarr``.

    Returns
    -------
    anndata.AnnData
        Keep it (and so the open file) alive while a model uses it.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is neither an HDF5 file nor a zarr store.
    """
    import anndata as ad
    from anndata.io import read_elem, sparse_dataset

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or store: {path}")
    if path.is_dir():
        import zarr

        root: Any = zarr.open_group(str(path), mode="r")
    else:
        import h5py

        if not h5py.is_hdf5(path):
            raise ValueError(f"{path} is neither an HDF5 (.h5ad) file nor a zarr store")
        root = h5py.File(path, "r")

    def on_disk(elem: Any) -> Any:
        encoding = elem.attrs.get("encoding-type", "array")
        return sparse_dataset(elem) if encoding in ("csr_matrix", "csc_matrix") else elem

    layers = {}
    if "layers" in root:
        layers = {name: on_disk(root["layers"][name]) for name in root["layers"].keys()}
    return ad.AnnData(
        X=on_disk(root["X"]) if "X" in root else None,
        obs=read_elem(root["obs"]),
        var=read_elem(root["var"]),
        uns=read_elem(root["uns"]) if "uns" in root else None,
        layers=layers,
    )


def shuffled_blocks(
    indices: np.ndarray, block_size: int, load_blocks: int, rng: np.random.Generator
) -> np.ndarray:
    """``indices`` in block-shuffled order.

    The sorted indices are cut into blocks of ``block_size`` consecutive entries (close
    rows on disk); the blocks are put in random order, and the cells of each run of
    ``load_blocks`` blocks are shuffled together.
    """
    rows = np.sort(np.asarray(indices, dtype=np.int64))
    starts = np.arange(0, len(rows), block_size)
    blocks = rng.permutation(len(starts))
    out = []
    for first in range(0, len(blocks), load_blocks):
        chosen = blocks[first : first + load_blocks]
        cells = np.concatenate([rows[starts[b] : starts[b] + block_size] for b in chosen])
        out.append(rng.permutation(cells))
    return np.concatenate(out) if out else rows


class Totals(NamedTuple):
    """A count matrix's row sums (``library``: per cell) and column sums (``genes``)."""

    library: np.ndarray
    genes: np.ndarray


# Totals of on-disk layers validated by setup_anndata, so that the model built right
# after it does not read the whole layer again: {(id(adata), layer): (ref, totals)}.
_SCANNED: dict[tuple[int, str | None], tuple[weakref.ref, Totals]] = {}


def remember_totals(adata: Any, layer: str | None, totals: Totals) -> None:
    """Keep the totals of ``adata``'s ``layer`` (``None``: ``X``) while ``adata`` lives."""
    for key in [k for k, (ref, _) in _SCANNED.items() if ref() is None]:
        del _SCANNED[key]
    _SCANNED[(id(adata), layer)] = (weakref.ref(adata), totals)


def totals_of(adata: Any, layer: str | None, store: CountStore, check: bool) -> Totals:
    """Row and column sums of ``store`` (``adata``'s ``layer``), remembered when on disk.

    An on-disk layer already scanned (and so checked) for the same AnnData object is
    not read again.
    """
    if not store.in_memory:
        ref, totals = _SCANNED.get((id(adata), layer), (None, None))
        if ref is not None and ref() is adata and len(totals.library) == store.n_rows:
            return totals
    totals = store.scan(check=check)
    if not store.in_memory:
        remember_totals(adata, layer, totals)
    return totals


def obs_columns(adata: Any) -> list[str]:
    """Column names of ``adata.obs`` (a pandas frame, or the lazy frame of ``read_lazy``)."""
    return [str(c) for c in adata.obs.columns]


def obs_labels(adata: Any, key: str) -> np.ndarray:
    """``adata.obs[key]`` as an array of strings (pandas or lazy ``obs``)."""
    column = adata.obs[key]
    if isinstance(column, pd.Series):
        return column.astype(str).to_numpy()
    values = column.to_numpy() if hasattr(column, "to_numpy") else np.asarray(column)
    return np.asarray(values).astype(str)
