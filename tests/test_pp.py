"""Preprocessing (paper appendix B): filters, phase scoring, HVG selection, layer subsetting."""

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pybivi import pp

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _screen(n_cells=300, n_other=300, seed=0, mouse=False):
    """NB counts with Tirosh marker genes: S markers up in 'S' cells, G2M markers in 'G2M' cells."""
    rng = np.random.default_rng(seed)
    markers = pp.cell_cycle_genes()
    genes = markers["S"] + markers["G2M"] + [f"GENE{i}" for i in range(n_other)]
    if mouse:
        genes = [g.capitalize() for g in genes]
    phase = rng.choice(["G1", "S", "G2M"], size=n_cells)
    mean = rng.uniform(0.5, 5, size=len(genes))[None, :].repeat(n_cells, 0)
    n_s, n_g = len(markers["S"]), len(markers["G2M"])
    mean[phase == "S", :n_s] *= 8
    mean[phase == "G2M", n_s : n_s + n_g] *= 8
    # Highly variable "other" genes at an unchanged average: up 1.9x in half of the cells and
    # down 10x in the other half, so they share seurat's mean bins with the flat genes.
    block = slice(n_s + n_g, n_s + n_g + 40)
    mean[:, block] = 2.0
    mean[: n_cells // 2, block] *= 1.9
    mean[n_cells // 2 :, block] *= 0.1
    spliced = rng.negative_binomial(5, 5 / (5 + mean))
    unspliced = rng.negative_binomial(5, 5 / (5 + 0.3 * mean))
    labels = rng.choice(["NT", "A", "B", "C", "junk"], size=n_cells)
    program = np.where(labels == "C", "unassigned", "p" + labels)
    program = np.where(labels == "NT", "control", program)
    doublet = rng.random(n_cells) < 0.05
    obs = pd.DataFrame(
        {"guide": labels, "prog": program, "true_phase": phase, "doublet": doublet},
        index=[f"c{i}" for i in range(n_cells)],
    )
    a = ad.AnnData(
        X=sp.csr_matrix(spliced.astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=genes),
        layers={
            "spliced": sp.csr_matrix(spliced.astype(np.float32)),
            "unspliced": sp.csr_matrix(unspliced.astype(np.float32)),
        },
    )
    return a


def test_markers_shipped_and_matched_in_mouse_case():
    m = pp.cell_cycle_genes()
    assert len(m["S"]) == 43 and len(m["G2M"]) == 54
    assert "MCM5" in m["S"] and "CDK1" in m["G2M"]
    mouse = pp.cell_cycle_genes(["Mcm5", "Cdk1", "Cenpu", "Xkr4"])
    # Cenpu is the current name of MLF1IP: matched through the alias column.
    assert mouse == {"S": ["Mcm5", "Cenpu"], "G2M": ["Cdk1"]}


@pytest.mark.parametrize("mouse", [False, True])
def test_prepare_filters_scores_and_subsets(mouse):
    a = _screen(mouse=mouse)
    out = pp.prepare(
        a, perturbation_key="guide", control_labels="NT", program_key="prog",
        drop_labels=["junk"], n_top_genes=100,
    )
    obs = a.obs
    expected = (~obs.doublet) & (obs.guide != "junk") & (obs.guide != "C")
    assert list(out.obs_names) == list(obs.index[expected])
    assert out.uns["pybivi_prepare"]["removed"]["doublets"] == int(obs.doublet.sum())
    assert out.n_vars == 100
    # Both layers subset consistently: same cells and genes as the input's entries.
    for layer in ("spliced", "unspliced"):
        want = a[out.obs_names, out.var_names].layers[layer].toarray()
        np.testing.assert_array_equal(out.layers[layer].toarray(), want)
    np.testing.assert_array_equal(out.X.toarray(), out.layers["spliced"].toarray())
    # The bimodal block is far more dispersed than the flat NB genes: seurat's z-scores are
    # within mean bins, so a few flat genes still rank high, but the block is enriched.
    kept = set(out.var_names)
    block_frac = np.mean([g in kept for g in a.var_names[97:137]])
    flat_frac = np.mean([g in kept for g in a.var_names[137:]])
    assert block_frac > 0.5 and flat_frac < 0.2
    # Phase recovered from the markers on the full transcriptome.
    scored, truth = out.obs["phase"].astype(str), out.obs["true_phase"]
    cycling = truth != "G1"
    assert (scored[cycling] == truth[cycling]).mean() > 0.95
    # G1 is "neither score above 0", relative to control genes drawn from the same
    # expression bins, so it is recovered less sharply than S and G2M.
    assert (scored == truth).mean() > 0.8
    assert out.obs["is_control"].sum() == (out.obs.guide == "NT").sum()


def test_prepare_skips_scoring_without_markers():
    rng = np.random.default_rng(1)
    counts = sp.csr_matrix(rng.poisson(2.0, size=(60, 30)).astype(np.int64))
    a = ad.AnnData(X=counts, layers={"spliced": counts, "unspliced": counts.copy()})
    a.var_names = [f"Gene{i}" for i in range(30)]
    a.obs["perturbation"] = np.where(np.arange(60) < 20, "NT", "X")
    a.obs["phase"] = "S"
    with pytest.warns(UserWarning, match="cell-cycle scoring skipped"):
        out = pp.prepare(a, control_labels=["NT"], n_top_genes=None)
    assert not out.uns["pybivi_prepare"]["cell_cycle_scored"]
    assert (out.obs["phase"] == "S").all()  # an existing column is left alone
    assert out.n_vars == 30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.prepare(a, control_labels=["NT"], n_top_genes=None, score_cell_cycle=False)


def test_prepare_drops_cells_with_empty_library():
    a = _screen(n_cells=50)
    dense = a.layers["unspliced"].toarray()
    dense[3, :] = 0
    a.layers["unspliced"] = sp.csr_matrix(dense)
    out = pp.prepare(a, "guide", "NT", doublet_key=None, score_cell_cycle=False, n_top_genes=None)
    assert "c3" not in out.obs_names and out.n_obs == 49


def test_prepare_errors_name_the_problem():
    a = _screen(n_cells=40)
    with pytest.raises(ValueError, match="'unspliced' layer"):
        b = a.copy()
        del b.layers["unspliced"]
        pp.prepare(b, "guide", "NT")
    with pytest.raises(KeyError, match="perturbation_key 'nope'"):
        pp.prepare(a, "nope", "NT")
    with pytest.raises(ValueError, match=r"control label\(s\) \['CTRL'\]"):
        pp.prepare(a, "guide", "CTRL")
    b = a.copy()
    b.layers["spliced"] = b.layers["spliced"] * 0.37
    with pytest.raises(ValueError, match="not integer-valued"):
        pp.prepare(b, "guide", "NT")
    b = a.copy()
    b.layers["spliced"].data[0] = -1
    with pytest.raises(ValueError, match="negative"):
        pp.prepare(b, "guide", "NT")
    with pytest.raises(ValueError, match="hvg_flavor"):
        pp.prepare(a, "guide", "NT", hvg_flavor="seurat_v3")


@pytest.mark.shared
@pytest.mark.parametrize("name", ["pancreas_100obs", "dentategyrus_100obs", "pancreas_739"])
def test_prepare_real_data_smoke(name):
    path = SHARED / "data" / f"{name}.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not available")
    a = ad.read_h5ad(path)
    a.obs["perturbation"] = np.where(np.arange(a.n_obs) % 3 == 0, "NT", "KO")
    out = pp.prepare(a, control_labels="NT", n_top_genes=2000)
    info = out.uns["pybivi_prepare"]
    assert info["cell_cycle_scored"]  # mouse gene names matched to the human markers
    assert set(out.obs["phase"].unique()) <= {"G1", "S", "G2M"}
    assert out.n_vars == min(2000, info["genes_in"])
    assert (np.asarray(out.layers["unspliced"].sum(1)).ravel() > 0).all()
    assert (np.asarray(out.layers["spliced"].sum(1)).ravel() > 0).all()
    want = a[out.obs_names, out.var_names].layers["unspliced"].toarray()
    np.testing.assert_array_equal(out.layers["unspliced"].toarray(), want)


def test_prepare_without_perturbations_keeps_every_singlet():
    """``perturbation_key=None`` (biVI-style data): no label rule, doublets still dropped."""
    a = _screen(n_cells=200, seed=3)
    del a.obs["guide"]  # no perturbation column at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pp.prepare(a, perturbation_key=None, n_top_genes=100)
    singlets = ~a.obs["doublet"].to_numpy()
    totals_n = np.asarray(a[:, out.var_names].layers["unspliced"].sum(1)).ravel()
    totals_m = np.asarray(a[:, out.var_names].layers["spliced"].sum(1)).ravel()
    expected = singlets & (totals_n > 0) & (totals_m > 0)
    assert list(out.obs_names) == list(a.obs_names[expected])
    assert out.n_vars == 100 and "is_control" not in out.obs
    assert out.uns["pybivi_prepare"]["perturbation_key"] == ""
    import pybivi

    pybivi.BiVI.setup_anndata(out, perturbation_key=None)  # ready for a model
    with pytest.raises(ValueError, match="need.*perturbation_key"):
        pp.prepare(a, perturbation_key=None, program_key="prog")
    with pytest.raises(ValueError, match="need.*perturbation_key"):
        pp.prepare(a, perturbation_key=None, drop_labels=["junk"])
