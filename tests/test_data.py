"""AnnData validation, registration and minibatching (pybivi.data)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pybivi import data, registry


def test_registry_and_batches_match_the_counts(make_adata):
    adata = make_adata()
    data.setup_anndata(adata)
    reg = data.make_registry(adata)
    assert reg.labels == ["A", "B", "NT"] and reg.control_labels == ["NT"]
    nascent, mature = adata.layers["unspliced"], adata.layers["spliced"]
    assert reg.reference_library["nascent"] == pytest.approx(np.median(nascent.sum(1)))
    assert reg.reference_library["mature"] == pytest.approx(np.median(mature.sum(1)))
    cells = data.CellData(adata, reg)
    idx = np.array([5, 0, 17, 3])
    b = cells.batch(idx)
    np.testing.assert_array_equal(b["x_nascent"].numpy(), nascent[idx])
    np.testing.assert_array_equal(b["x_mature"].numpy(), mature[idx])
    np.testing.assert_allclose(b["library_nascent"].numpy(), nascent[idx].sum(1))
    np.testing.assert_allclose(b["library_mature"].numpy(), mature[idx].sum(1))
    labels = adata.obs["perturbation"].to_numpy()[idx]
    assert [reg.labels[i] for i in b["label"].tolist()] == list(labels)
    assert b["is_control"].tolist() == list(labels == "NT")
    assert b["index"].tolist() == idx.tolist() and b["label"].dtype == torch.long
    assert b["is_control"].dtype == torch.bool and b["x_mature"].dtype == torch.float32


def test_sparse_counts_stay_sparse_and_give_the_same_batches(make_adata):
    dense, sparse = make_adata(), make_adata(sparse=True)
    for a in (dense, sparse):
        data.setup_anndata(a)
    assert sp.issparse(sparse.layers["spliced"])
    reg = data.make_registry(sparse)
    b_dense = data.CellData(dense, reg).batch(np.arange(10))
    b_sparse = data.CellData(sparse, reg).batch(np.arange(10))
    for key in b_dense:
        assert torch.equal(b_dense[key], b_sparse[key]), key


def test_iterate_covers_each_cell_once_and_drops_singletons(make_adata):
    adata = make_adata(n_cells=41 - 1)
    data.setup_anndata(adata)
    cells = data.CellData(adata, data.make_registry(adata))
    seen = np.concatenate([b["index"].numpy() for b in cells.iterate(batch_size=7, shuffle=True)])
    assert sorted(seen.tolist()) == list(range(40))
    sizes = [len(b["index"]) for b in cells.iterate(np.arange(15), 7, drop_singleton=True)]
    assert sizes == [7, 7]


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda a: a.layers.pop("unspliced"), KeyError, "unspliced"),
        (lambda a: a.obs.drop(columns="perturbation", inplace=True), KeyError, "perturbation"),
        (lambda a: a.layers["spliced"].__setitem__((0, 1), -1.0), ValueError, "negative"),
        (lambda a: a.layers["unspliced"].__setitem__((2, 3), 0.5), ValueError, "non-integer"),
        (lambda a: a.layers["spliced"].__setitem__((4, 4), np.nan), ValueError, "NaN"),
        (lambda a: a.layers["unspliced"].__setitem__(5, 0.0), ValueError, "no nascent counts"),
        (lambda a: a.obs.__setitem__("perturbation", "A"), ValueError, "never occur"),
    ],
)
def test_setup_rejects_bad_input(make_adata, mutate, error, match):
    adata = make_adata()
    mutate(adata)
    with pytest.raises(error, match=match):
        data.setup_anndata(adata)


def test_setup_needs_control_and_perturbed_cells(make_adata):
    adata = make_adata()
    adata.obs["perturbation"] = np.where(adata.obs["perturbation"] == "NT", "NT", "A")
    with pytest.raises(ValueError, match="no perturbed cells"):
        data.setup_anndata(adata, control_labels=("NT", "A"))
    with pytest.raises(ValueError, match="never occur"):
        data.setup_anndata(adata, control_labels="NT2")
    with pytest.raises(ValueError, match="no control cells"):
        data.setup_anndata(adata, control_labels=())
    # a non-contrastive model does not need labels at all
    adata.obs = adata.obs.drop(columns="perturbation")
    data.setup_anndata(adata, contrastive=False)
    assert data.make_registry(adata).perturbation_key is None


def test_mismatched_shapes_are_reported():
    with pytest.raises(ValueError, match="shape"):
        registry._check_counts(np.ones((3, 4)), "mature counts", (3, 5))


def test_mature_only_setup_ignores_a_missing_nascent_layer(make_adata):
    adata = make_adata()
    del adata.layers["unspliced"]
    data.setup_anndata(adata, use_nascent=False, mature_layer=None)
    reg = data.make_registry(adata)
    assert not reg.use_nascent and np.isnan(reg.reference_library["nascent"])
    batch = data.CellData(adata, reg).batch(np.arange(4))
    assert "x_nascent" not in batch and "library_nascent" not in batch


def test_a_different_gene_set_is_refused_and_registry_round_trips(make_adata):
    adata = make_adata()
    data.setup_anndata(adata)
    reg = data.make_registry(adata)
    assert data.Registry.from_dict(reg.to_dict()) == reg
    other = make_adata()[:, ::-1].copy()
    with pytest.raises(ValueError, match="genes"):
        data.CellData(other, reg)
    unknown = make_adata()
    unknown.obs["perturbation"] = np.where(unknown.obs["perturbation"] == "A", "C", "NT")
    b = data.CellData(unknown, reg).batch(np.arange(4))
    assert b["label"].tolist()[1] == -1  # an unseen label maps to -1
