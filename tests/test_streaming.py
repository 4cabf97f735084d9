"""Counts that stay on disk: backed h5ad and zarr stores, read a block of rows at a time."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import pybivi
from pybivi import _disk_arrays, data, storage

torch.set_num_threads(1)

FAST = dict(max_epochs=2, batch_size=16, progress_bar=False)


def _write(adata, tmp_path, fmt):
    path = tmp_path / f"cells.{fmt}"
    if fmt == "h5ad":
        adata.write_h5ad(path)
    else:
        adata.write_zarr(path)
    return path


def _fit(adata, block_size="unchanged"):
    pybivi.ContrastiveBiVI.setup_anndata(adata)
    model = pybivi.ContrastiveBiVI(adata, n_hidden=16, scheme="bursty", seed=0)
    if block_size != "unchanged":
        model.shuffle_block_size = block_size
    model.train(seed=0, **FAST)
    return model


@pytest.fixture(scope="module")
def in_memory(make_adata):
    """A trained in-memory model (cells shuffled one by one) and its AnnData."""
    adata = make_adata(n_cells=96, sparse=True)
    return _fit(adata), adata


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_on_disk_training_and_exports_equal_the_in_memory_ones(in_memory, tmp_path, fmt):
    reference, adata = in_memory
    lazy = storage.open_lazy(_write(adata, tmp_path, fmt))
    assert not sp.issparse(lazy.layers["spliced"])  # the counts stay on disk
    model = _fit(lazy, block_size=None)  # same single-cell shuffling as in memory
    assert not model._cells.in_memory
    np.testing.assert_allclose(model.history["train_loss"], reference.history["train_loss"])
    for kind in ("salient", "background"):
        np.testing.assert_allclose(
            model.get_latent_representation(kind=kind),
            reference.get_latent_representation(kind=kind),
            rtol=1e-5,
            atol=1e-6,
        )
    export, expected = (
        m.posterior(n_samples=3, groupby="perturbation", seed=1, batch_size=20)
        for m in (model, reference)
    )
    for group in ("posterior", "observed_data", "constant_data"):
        for name, values in expected[group].data_vars.items():
            if values.dtype.kind in "fiu":
                np.testing.assert_allclose(export[group][name].values, values.values, rtol=1e-5)
            else:
                np.testing.assert_array_equal(export[group][name].values, values.values)
    for test in (pybivi.tl.de.kinetic, pybivi.tl.de.mean):
        got, want = (
            test(m, "perturbation", n_draws=10, n_posterior=50, null_repeats=0, seed=2)
            for m in (model, reference)
        )
        np.testing.assert_allclose(
            got.select_dtypes("number").to_numpy(),
            want.select_dtypes("number").to_numpy(),
            rtol=1e-5,
            equal_nan=True,
        )
    pairs = [
        pybivi.tl.de.mean(m, "perturbation", method="pairs", n_samples=10, seed=2)
        for m in (model, reference)
    ]
    np.testing.assert_allclose(pairs[0]["pseudocounts"], pairs[1]["pseudocounts"], rtol=1e-6)
    got, want = (pybivi.tl.ppc.ppc(m, n_replicates=3, seed=3) for m in (model, reference))
    np.testing.assert_allclose(got.observed.to_numpy(), want.observed.to_numpy(), equal_nan=True)
    np.testing.assert_allclose(
        got.table["replicate_mean"], want.table["replicate_mean"], rtol=1e-5, equal_nan=True
    )


def test_block_shuffled_training_is_the_same_in_memory_and_on_disk(make_adata, tmp_path):
    adata = make_adata(n_cells=96, sparse=True)
    lazy = storage.open_lazy(_write(adata, tmp_path, "h5ad"))
    memory, disk = _fit(adata, block_size=8), _fit(lazy)  # on disk: blocks by default
    assert disk.shuffle_block_size == storage.DEFAULT_BLOCK_SIZE
    # Whatever the storage, the same block order gives the same training.
    again = _fit(storage.open_lazy(tmp_path / "cells.h5ad"), block_size=8)
    np.testing.assert_allclose(again.history["train_loss"], memory.history["train_loss"])


def test_training_minibatches_follow_the_block_shuffle(make_adata):
    """Each epoch's minibatches hold the cells of a few contiguous blocks, not random cells."""
    from pybivi.training_data import ShardedCells

    adata = make_adata(n_cells=400, sparse=True)
    pybivi.ContrastiveVI.setup_anndata(adata)
    model = pybivi.ContrastiveVI(adata, n_hidden=16, seed=0)
    cells = model._cells
    indices = np.arange(0, 400)
    sharded = ShardedCells(cells, indices, batch_size=40, seed=3, plan=None)
    np.testing.assert_array_equal(np.sort(sharded.share(0)), indices)
    # Single cells: a window of 40 cells spans almost the whole range of rows.
    cells.block_size = None
    spans = [np.ptp(w) for w in np.split(sharded.share(0), 10)]
    assert min(spans) > 200
    # Blocks of 20 rows, 2 loaded at a time: every 40 cells come from two blocks.
    cells.block_size, cells.load_blocks = 20, 2
    for epoch in (0, 1):
        order = sharded.share(epoch)
        for window in np.split(order, 10):
            assert len(np.unique(window // 20)) == 2
    assert not np.array_equal(sharded.share(0), sharded.share(1))


def test_shuffled_blocks_cover_each_cell_once_in_contiguous_blocks():
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(1000, size=700, replace=False))
    order = storage.shuffled_blocks(cells, block_size=50, load_blocks=3, rng=rng)
    np.testing.assert_array_equal(np.sort(order), cells)
    assert not np.array_equal(order, cells)
    # Each run of 3 blocks (150 cells) holds exactly 3 blocks of 50 consecutive cells.
    for first in range(0, 600, 150):
        block_ids = np.searchsorted(cells, order[first : first + 150]) // 50
        assert len(np.unique(block_ids)) == 3


def test_rows_come_from_disk_a_bounded_block_at_a_time(make_adata, tmp_path, monkeypatch):
    adata = make_adata(n_cells=200, sparse=True)
    lazy = storage.open_lazy(_write(adata, tmp_path, "zarr"))
    reads = []
    original = storage.CountStore.read_slice

    def counted(self, start, stop):
        reads.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(storage.CountStore, "read_slice", counted)
    monkeypatch.setattr(storage, "SCAN_BLOCK_SIZE", 32)
    monkeypatch.setattr(_disk_arrays, "MAX_GAP", 1)  # only consecutive rows share a read
    # ... and no stored entries join two rows' reads (the store's arrays count as uncompressed)
    monkeypatch.setattr(_disk_arrays, "MAX_GAP_ENTRIES", -1)
    monkeypatch.setattr(_disk_arrays, "is_compressed", lambda array: False)
    pybivi.ContrastiveBiVI.setup_anndata(lazy)
    assert 0 < max(reads) <= 32 and sum(reads) == 2 * 200  # one pass per layer
    reads.clear()
    # (a CME model would also score every cell after training, in batches of 512)
    pybivi.ContrastiveVI.setup_anndata(lazy)
    reads.clear()
    pybivi.ContrastiveVI(lazy, n_hidden=16, seed=0, frequency_init="random")
    assert reads == []  # the setup's library sizes are reused
    model = pybivi.ContrastiveVI(lazy, n_hidden=16, seed=0)
    # and so are its gene totals, where the decoder starts (the data's frequencies)
    assert reads == []
    np.testing.assert_allclose(
        model._cells.gene_totals()["mature"], adata.layers["spliced"].sum(0).A1
    )
    cells = model._cells
    cells.block_size, cells.load_blocks = 16, 2
    model.train(seed=0, **FAST)
    assert 0 < max(reads) <= 32  # two blocks of 16 at a time
    reads.clear()
    model.get_latent_representation(batch_size=50)
    assert 0 < max(reads) <= 50
    for name, store in cells._stores.items():
        assert not store.in_memory and not sp.issparse(store.matrix)
        np.testing.assert_array_equal(
            cells.library[name],
            adata.layers["spliced" if name == "mature" else "unspliced"].sum(1).A1,
        )
    batch = cells.batch(np.array([150, 3, 3, 77]))
    np.testing.assert_array_equal(
        batch["x_mature"].numpy(), adata.layers["spliced"][[150, 3, 3, 77]].toarray()
    )


def test_backed_h5ad_keeps_x_on_disk(make_adata, tmp_path):
    adata = make_adata(n_cells=64, sparse=True)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    for a in (adata, backed):
        pybivi.ContrastiveBiVI.setup_anndata(a, mature_layer=None)
    models = [
        pybivi.ContrastiveBiVI(a, n_hidden=16, scheme="bursty", seed=0) for a in (adata, backed)
    ]
    assert not models[1]._cells._stores["mature"].in_memory
    models[1].shuffle_block_size = None
    for m in models:
        m.train(seed=0, **FAST)
    np.testing.assert_allclose(
        models[1].get_latent_representation(),
        models[0].get_latent_representation(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_bad_on_disk_input_is_reported(make_adata, tmp_path):
    adata = make_adata(n_cells=40, sparse=True)
    adata.layers["spliced"] = adata.layers["spliced"].tocsc()
    adata.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="by columns"):
        pybivi.ContrastiveBiVI.setup_anndata(storage.open_lazy(tmp_path / "csc.h5ad"))
    adata = make_adata(n_cells=40, sparse=True)
    adata.layers["spliced"].data[-1] = 2.5
    adata.write_zarr(tmp_path / "float.zarr")
    with pytest.raises(ValueError, match="non-integer"):
        pybivi.ContrastiveBiVI.setup_anndata(storage.open_lazy(tmp_path / "float.zarr"))
    with pytest.raises(FileNotFoundError):
        storage.open_lazy(tmp_path / "missing.h5ad")
    (tmp_path / "text.h5ad").write_text("not hdf5")
    with pytest.raises(ValueError, match="neither"):
        storage.open_lazy(tmp_path / "text.h5ad")
    cells = data.CellData(make_adata(n_cells=8), _registry(make_adata(n_cells=8)))
    with pytest.raises(ValueError, match="block_size"):
        cells.block_size = 0


def _registry(adata):
    data.setup_anndata(adata)
    return data.make_registry(adata)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_anndata_read_lazy_streams_too(make_adata, tmp_path, fmt):
    pytest.importorskip("dask")
    adata = make_adata(n_cells=64, sparse=True)
    lazy = ad.experimental.read_lazy(_write(adata, tmp_path, fmt))
    reference, model = _fit(adata), _fit(lazy, block_size=None)
    assert not model._cells.in_memory
    np.testing.assert_allclose(
        model.get_latent_representation(),
        reference.get_latent_representation(),
        rtol=1e-5,
        atol=1e-6,
    )


def _lazy_layer(path, fmt, chunks):
    """read_lazy's dask array of the 'spliced' layer, cut into ``chunks`` rows per chunk."""
    import h5py
    import zarr

    root = h5py.File(path, "r") if fmt == "h5ad" else zarr.open_group(path, mode="r")
    return ad.experimental.read_elem_lazy(root["layers"]["spliced"], chunks=(chunks, -1))


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_lazy_layers_are_read_from_their_stored_arrays(make_adata, tmp_path, fmt, monkeypatch):
    da = pytest.importorskip("dask.array")
    adata = make_adata(n_cells=300, sparse=True)
    expected = adata.layers["spliced"]
    path = _write(adata, tmp_path, fmt)
    layers = [
        ad.experimental.read_lazy(path).layers["spliced"],
        _lazy_layer(path, fmt, chunks=40),
        storage.open_lazy(path).layers["spliced"],
    ]
    stores = [storage.CountStore(layer, "counts") for layer in layers]

    def through_dask(*args, **kwargs):
        raise AssertionError("rows were read through dask")

    monkeypatch.setattr(da.Array, "compute", through_dask)
    rows = np.array([299, 0, 5, 5, 150, 151, 7, 42])
    for store in stores:
        assert store.reads_through == "arrays"
        assert (store.read(rows) != expected[rows]).nnz == 0
        assert (store.read_slice(10, 250) != expected[10:250]).nnz == 0
        assert store.read_slice(3, 3).shape == (0, adata.n_vars)
        totals = store.scan(block_size=64)
        np.testing.assert_array_equal(totals.library, expected.sum(1).A1)
        np.testing.assert_array_equal(totals.genes, expected.sum(0).A1)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_other_dask_arrays_are_read_whole_chunks_at_a_time_in_this_thread(
    make_adata, tmp_path, fmt, monkeypatch
):
    pytest.importorskip("dask")
    import threading

    adata = make_adata(n_cells=300, sparse=True)
    expected = adata.layers["spliced"][:290]
    path = _write(adata, tmp_path, fmt)
    # A subset of read_lazy's array is no longer its stored arrays: dask reads it.
    store = storage.CountStore(_lazy_layer(path, fmt, chunks=50)[:290], "x")
    assert store.reads_through == "dask"
    # Each dask chunk reads its rows from a backed dataset: record which rows, and where.
    backed = type(storage.open_lazy(path).layers["spliced"])
    original, reads, threads = backed.__getitem__, [], set()

    def recorded(self, index):
        threads.add(threading.get_ident())
        reads.append((index[0].start, index[0].stop))
        return original(self, index)

    monkeypatch.setattr(backed, "__getitem__", recorded)
    rows = np.array([120, 3, 7, 40, 121, 289, 3])
    got = store.read(rows)
    assert (got != expected[rows]).nnz == 0
    # each chunk with a wanted row, once, read in this thread (the synchronous scheduler)
    assert sorted(reads) == [(0, 50), (100, 150), (250, 300)]
    assert threads == {threading.get_ident()}
    reads.clear()
    monkeypatch.setattr(storage, "SCAN_BLOCK_SIZE", 120)  # blocks of 100 rows: 2 chunks
    totals = store.scan()
    assert sorted(reads) == [(start, start + 50) for start in range(0, 300, 50)]
    np.testing.assert_array_equal(totals.library, expected.sum(1).A1)


def test_scattered_rows_share_a_read_within_a_compressed_chunk(make_adata, tmp_path, monkeypatch):
    import h5py
    import zarr
    from anndata.io import sparse_dataset, write_elem

    counts = sp.csr_matrix(make_adata(n_cells=400, sparse=True).layers["spliced"])
    chunk = counts.nnz // 5
    monkeypatch.setattr(_disk_arrays, "MAX_GAP_ENTRIES", 1)
    # each more than _MAX_GAP rows from the next, some less than a chunk (5 in all) apart
    rows = np.array([0, 70, 210, 280, 399])
    starts, stops = counts.indptr[rows], counts.indptr[rows + 1]
    with h5py.File(tmp_path / "plain.h5", "w") as plain:  # uncompressed
        write_elem(plain, "m", counts, dataset_kwargs={"chunks": (chunk,)})
        store = storage.CountStore(sparse_dataset(plain["m"]), "x")
        assert [len(run) for _, _, run in store._spans(rows)] == [1] * len(rows)
        assert (store.read(rows) != counts[rows]).nnz == 0
    packed = zarr.open_group(tmp_path / "packed.zarr", mode="w")  # compressed
    write_elem(packed, "m", counts, dataset_kwargs={"chunks": (chunk,)})
    store = storage.CountStore(sparse_dataset(packed["m"]), "x")
    spans = store._spans(rows)
    first_of_span = np.cumsum([0] + [len(run) for _, _, run in spans])[1:-1]
    # two neighbours share a read exactly when less than a chunk of entries lies between
    apart = starts[1:] - stops[:-1] > chunk
    np.testing.assert_array_equal(np.flatnonzero(apart) + 1, first_of_span)
    assert 1 < len(spans) < len(rows)
    assert (store.read(rows) != counts[rows]).nnz == 0
    # a run stops growing at _MAX_RUN_ENTRIES (at least two chunks) stored entries
    monkeypatch.setattr(_disk_arrays, "MAX_RUN_ENTRIES", 1)
    store = storage.CountStore(sparse_dataset(packed["m"]), "x")
    every = np.arange(400)
    spans = store._spans(every)
    assert len(spans) > 1
    assert all(counts.indptr[stop] - counts.indptr[start] <= 2 * chunk for start, stop, _ in spans)
    np.testing.assert_array_equal(np.concatenate([run for _, _, run in spans]), every)
    assert (store.read(every[::-1]) != counts[::-1]).nnz == 0
