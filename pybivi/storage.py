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
#: Two requested rows closer than this are read in one contiguous run (the rows between
#: them are read and dropped: cheaper than a second read).
_MAX_GAP = 64
#: The same in stored entries, for a sparse matrix read from its arrays: an uncompressed
#: read of 65,536 skipped entries (0.5 MB) costs about what a second read call costs. A
#: compressed array is decompressed a whole chunk at a time, so there the gap is one
#: chunk: two reads in one chunk would decompress it twice.
_MAX_GAP_ENTRIES = 1 << 16
#: Whether rows of a sparse matrix read from its arrays share runs by stored entries (as
#: above) besides rows (``_MAX_GAP``).
_MERGE_BY_ENTRIES = True
#: A run grown by the gaps above stops at this many stored entries (64 MB of float32
#: values and int32 indices), so that scattered rows never read a large span at once.
_MAX_RUN_ENTRIES = 1 << 23


def _is_dask(matrix: Any) -> bool:
    return type(matrix).__module__.startswith("dask.") and hasattr(matrix, "compute")


def _is_sparse_dataset(matrix: Any) -> bool:
    from anndata.abc import CSCDataset, CSRDataset

    return isinstance(matrix, (CSRDataset, CSCDataset))


def _is_disk_array(matrix: Any) -> bool:
    """An HDF5 or zarr array (dense, read by slicing)."""
    module = type(matrix).__module__
    return module.startswith(("h5py", "zarr")) and hasattr(matrix, "shape")


class _CSRArrays:
    """Rows of a CSR matrix stored in anndata's layout: ``data``, ``indices``, ``indptr``.

    ``indptr`` is read once and kept (one integer per row): each read of rows is then one
    slice of ``data`` and one of ``indices``.

    Parameters
    ----------
    group
        The HDF5 or zarr group (``encoding-type`` ``csr_matrix``).
    shape
        The matrix's shape.
    owner
        An object to keep alive as long as the group is read (an HDF5 file opened for
        it), or ``None``.
    """

    def __init__(self, group: Any, shape: tuple[int, int], owner: Any = None) -> None:
        self.data, self.indices = group["data"], group["indices"]
        self.indptr = np.asarray(group["indptr"][:])
        self.shape = shape
        self.owner = owner
        self.dtype = np.dtype(self.data.dtype)
        chunks = getattr(self.data, "chunks", None)
        self.gap_entries = _MAX_GAP_ENTRIES
        if chunks and _is_compressed(self.data):
            self.gap_entries = max(int(chunks[0]), _MAX_GAP_ENTRIES)
        self.run_entries = max(_MAX_RUN_ENTRIES, 2 * self.gap_entries)

    def read_slice(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as scipy CSR."""
        low, high = int(self.indptr[start]), int(self.indptr[stop])
        indptr = self.indptr[start : stop + 1] - self.indptr[start]
        return sp.csr_matrix(
            (self.data[low:high], self.indices[low:high], indptr),
            shape=(stop - start, self.shape[1]),
        )

    def runs(self, wanted: np.ndarray) -> list[np.ndarray]:
        """``wanted`` (sorted distinct rows) cut into runs to read one span each.

        Neighbours share a run when they are fewer than ``_MAX_GAP`` rows or
        ``gap_entries`` stored entries apart, until the run spans ``run_entries`` entries.
        """
        starts = self.indptr[wanted].astype(np.int64)
        stops = self.indptr[wanted + 1].astype(np.int64)
        apart = np.diff(wanted) > _MAX_GAP
        if _MERGE_BY_ENTRIES:
            apart &= starts[1:] - stops[:-1] > self.gap_entries
        runs = []
        for run in np.split(np.arange(len(wanted)), np.flatnonzero(apart) + 1):
            first = run[0]
            # The span of rows first..i is stops[i] - starts[first] entries; cut the run
            # where it would pass run_entries (a single long row still gets a run).
            while first <= run[-1]:
                limit = starts[first] + self.run_entries
                last = max(first, int(np.searchsorted(stops, limit, side="right")) - 1)
                last = min(last, run[-1])
                runs.append(wanted[first : last + 1])
                first = last + 1
        return runs


def _is_compressed(array: Any) -> bool:
    """Whether reading part of an HDF5 or zarr array decompresses whole chunks."""
    if type(array).__module__.startswith("h5py"):
        return array.id.get_create_plist().get_nfilters() > 0
    return bool(getattr(array, "compressors", None) or getattr(array, "compressor", None))


def _csr_arrays(matrix: Any) -> _CSRArrays | None:
    """The stored arrays behind an on-disk CSR matrix, or ``None`` where not reachable.

    An anndata backed dataset exposes its group. For a dask array this relies on how
    ``anndata.experimental.read_lazy`` builds it: one graph layer whose tasks call
    ``make_dask_chunk`` with the HDF5 file's path and the element's name, or with a zarr
    backed dataset. Any other dask array (a subset, a computed one, another version's
    layout) is not reached and is read through dask.
    """
    shape = tuple(int(s) for s in matrix.shape)
    if _is_sparse_dataset(matrix):
        group = getattr(matrix, "group", None)
        if group is None or group.attrs.get("encoding-type") != "csr_matrix":
            return None
        return _CSRArrays(group, shape)
    if not _is_dask(matrix):
        return None
    source = _read_lazy_source(matrix)
    if source is None:
        return None
    where, name = source
    owner = None
    try:
        if _is_sparse_dataset(where):
            group = getattr(where, "group", None)
            if group is None:
                return None
        elif isinstance(where, (str, Path)):
            import h5py

            owner = h5py.File(where, "r")
            group = owner[name]
        else:
            return None
        attrs = group.attrs
        fits = (
            attrs.get("encoding-type") == "csr_matrix"
            and tuple(int(s) for s in attrs["shape"]) == shape
            and np.dtype(group["data"].dtype) == np.dtype(matrix.dtype)
        )
        if fits:
            return _CSRArrays(group, shape, owner)
    except (OSError, KeyError, TypeError, ValueError):
        pass
    if owner is not None:
        owner.close()
    return None


def _read_lazy_source(matrix: Any) -> tuple[Any, str] | None:
    """``(path or backed dataset, element name)`` read by a ``read_lazy`` dask array."""
    import functools

    try:
        layers = matrix.__dask_graph__().layers
        if list(layers) != [matrix.name]:  # subsets, casts etc. add layers
            return None
        task = matrix.__dask_graph__()[(matrix.name,) + (0,) * matrix.ndim]
    except (AttributeError, KeyError, TypeError):
        return None
    # A task is a dask Task (arguments in .args, constants wrapped in DataNode.value) or,
    # in older dask versions, a tuple (function, *arguments).
    args = getattr(task, "args", task[1:] if isinstance(task, tuple) else ())
    for arg in args:
        arg = getattr(arg, "value", arg)
        if (
            isinstance(arg, functools.partial)
            and getattr(arg.func, "__name__", "") == "make_dask_chunk"
            and str(getattr(arg.func, "__module__", "")).startswith("anndata")
            and len(arg.args) == 2
        ):
            return arg.args[0], str(arg.args[1])
    return None


def _dask_bounds(matrix: Any) -> np.ndarray:
    """Row where each chunk of a dask array starts, and the row count at the end."""
    return np.concatenate([[0], np.cumsum(matrix.chunks[0])]).astype(np.int64)


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
        elif _is_sparse_dataset(matrix) or _is_disk_array(matrix) or _is_dask(matrix):
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
            self._csr = _csr_arrays(matrix) if layout == "csr" else None
            if self._csr is None and _is_dask(matrix):
                self._bounds = _dask_bounds(matrix)
        elif hasattr(matrix, "__array__"):
            self.matrix = np.asarray(matrix)
        else:
            raise TypeError(f"{what} has an unsupported type {type(matrix).__name__}")
        self.dtype = np.dtype(self.matrix.dtype)

    _csr: _CSRArrays | None = None
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
        if _is_dask(block):
            # The chunks are read one after another: dask's threads cost more than they
            # give on a few cores, and h5py runs one call at a time anyway.
            block = block.compute(scheduler="synchronous")
        return sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)

    def read(self, rows: np.ndarray) -> Any:
        """Rows ``rows`` (any order, repeats allowed) in memory, in that order.

        In memory this is plain indexing. On disk the distinct rows are read as few
        contiguous spans and reordered: rows less than ``_MAX_GAP`` apart share a span;
        so do rows of a sparse matrix read from its stored arrays that are less than a
        compressed chunk (or ``_MAX_GAP_ENTRIES`` uncompressed entries) apart; a dask
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
            breaks = np.flatnonzero(np.diff(wanted) > _MAX_GAP) + 1
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
