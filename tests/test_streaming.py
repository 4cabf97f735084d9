"""Counts that stay on disk: backed h5ad and zarr stores, read a block of rows at a time."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import pybivi
from pybivi import data, storage

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
    monkeypatch.setattr(storage, "_MAX_GAP", 1)  # only consecutive rows share a read
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
