"""How pybivi reaches the stored arrays of on-disk count matrices, and when it merges reads.

The low level of :mod:`pybivi.storage`: anndata's backed sparse datasets, HDF5 and zarr
arrays, and the dask arrays of ``anndata.experimental.read_lazy``, whose on-disk group is
found in their dask graph. A CSR matrix stored in anndata's layout (``data``, ``indices``,
``indptr``) is read straight from those arrays (:class:`CSRArrays`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "MAX_GAP",
    "MAX_GAP_ENTRIES",
    "MAX_RUN_ENTRIES",
    "CSRArrays",
    "csr_arrays",
    "dask_bounds",
    "is_compressed",
    "is_dask",
    "is_disk_array",
    "is_sparse_dataset",
    "read_lazy_source",
]

#: Two requested rows closer than this are read in one contiguous run (the rows between
#: them are read and dropped: cheaper than a second read).
MAX_GAP = 64
#: The same in stored entries, for a sparse matrix read from its arrays: an uncompressed
#: read of 65,536 skipped entries (0.5 MB) costs about what a second read call costs. A
#: compressed array is decompressed a whole chunk at a time, so there the gap is one
#: chunk: two reads in one chunk would decompress it twice.
MAX_GAP_ENTRIES = 1 << 16
#: A run grown by the gaps above stops at this many stored entries (64 MB of float32
#: values and int32 indices), so that scattered rows never read a large span at once.
MAX_RUN_ENTRIES = 1 << 23


def is_dask(matrix: Any) -> bool:
    return type(matrix).__module__.startswith("dask.") and hasattr(matrix, "compute")


def is_sparse_dataset(matrix: Any) -> bool:
    from anndata.abc import CSCDataset, CSRDataset

    return isinstance(matrix, (CSRDataset, CSCDataset))


def is_disk_array(matrix: Any) -> bool:
    """An HDF5 or zarr array (dense, read by slicing)."""
    module = type(matrix).__module__
    return module.startswith(("h5py", "zarr")) and hasattr(matrix, "shape")


class CSRArrays:
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
        self.gap_entries = MAX_GAP_ENTRIES
        if chunks and is_compressed(self.data):
            self.gap_entries = max(int(chunks[0]), MAX_GAP_ENTRIES)
        self.run_entries = max(MAX_RUN_ENTRIES, 2 * self.gap_entries)

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

        Neighbours share a run when they are fewer than ``MAX_GAP`` rows or
        ``gap_entries`` stored entries apart, until the run spans ``run_entries`` entries.
        """
        starts = self.indptr[wanted].astype(np.int64)
        stops = self.indptr[wanted + 1].astype(np.int64)
        apart = (np.diff(wanted) > MAX_GAP) & (starts[1:] - stops[:-1] > self.gap_entries)
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


def is_compressed(array: Any) -> bool:
    """Whether reading part of an HDF5 or zarr array decompresses whole chunks."""
    if type(array).__module__.startswith("h5py"):
        return array.id.get_create_plist().get_nfilters() > 0
    return bool(getattr(array, "compressors", None) or getattr(array, "compressor", None))


def csr_arrays(matrix: Any) -> CSRArrays | None:
    """The stored arrays behind an on-disk CSR matrix, or ``None`` where not reachable.

    An anndata backed dataset exposes its group. For a dask array this relies on how
    ``anndata.experimental.read_lazy`` builds it: one graph layer whose tasks call
    ``make_dask_chunk`` with the HDF5 file's path and the element's name, or with a zarr
    backed dataset. Any other dask array (a subset, a computed one, another version's
    layout) is not reached and is read through dask.
    """
    shape = tuple(int(s) for s in matrix.shape)
    if is_sparse_dataset(matrix):
        group = getattr(matrix, "group", None)
        if group is None or group.attrs.get("encoding-type") != "csr_matrix":
            return None
        return CSRArrays(group, shape)
    if not is_dask(matrix):
        return None
    source = read_lazy_source(matrix)
    if source is None:
        return None
    where, name = source
    owner = None
    try:
        if is_sparse_dataset(where):
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
            return CSRArrays(group, shape, owner)
    except (OSError, KeyError, TypeError, ValueError):
        pass
    if owner is not None:
        owner.close()
    return None


def read_lazy_source(matrix: Any) -> tuple[Any, str] | None:
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


def dask_bounds(matrix: Any) -> np.ndarray:
    """Row where each chunk of a dask array starts, and the row count at the end."""
    return np.concatenate([[0], np.cumsum(matrix.chunks[0])]).astype(np.int64)
