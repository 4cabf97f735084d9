"""The Perturb-seq simulator: structure, ground truth, and exact-CME moments."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pybivi import datasets

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def screen():
    return datasets.simulate_perturbseq(n_cells=700, n_genes=240, seed=3)


def test_structure(screen):
    a = screen
    assert a.shape == (700, 240)
    for layer in ("unspliced", "spliced"):
        m = a.layers[layer]
        assert sp.issparse(m) and np.issubdtype(m.dtype, np.integer) and m.data.min() >= 0
    assert (a.X != a.layers["spliced"]).nnz == 0
    obs = a.obs
    assert set(obs["phase"]) == {"G1", "S", "G2M"}
    ctrl = obs["perturbation"] == "NT"
    assert (obs.loc[ctrl, "program"] == "control").all()
    assert abs(ctrl.mean() - 0.3) < 0.05
    # Several target-gene-like perturbations per program, weak ones unannotated.
    singles = obs[~obs["doublet"] & ~ctrl]
    per_prog = singles[singles.program != "unassigned"].groupby("program", observed=True)
    assert (per_prog["perturbation"].nunique() == 3).all() and per_prog.ngroups == 6
    assert singles.loc[singles.program == "unassigned", "perturbation"].str.startswith("WEAK").all()
    doublets = obs[obs["doublet"]]
    assert len(doublets) == 14 and doublets["perturbation"].str.contains("_").all()
    # Library size follows the capture efficiency.
    lib = np.asarray(a.layers["spliced"].sum(1)).ravel()
    assert np.corrcoef(np.log(lib), np.log(obs["capture_efficiency"]))[0, 1] > 0.8


def test_truth_kinds(screen):
    a = screen
    kinds = a.varm["effect_kind"]
    lb, lg = a.varm["log2_b_change"], a.varm["log2_gamma_change"]
    names = a.uns["simulation"]["effect_kinds"]
    assert kinds.shape == (240, 6)
    three = ("burst_size", "degradation", "compensatory")
    burst, degr, comp = (kinds == names.index(k) for k in three)
    assert (lb[burst] != 0).all() and (lg[burst] == 0).all()
    assert (lg[degr] != 0).all() and (lb[degr] == 0).all()
    np.testing.assert_array_equal(lb[comp], lg[comp])  # mature mean b/gamma unchanged
    changed = kinds > 0
    assert (np.abs(lb[changed]) + np.abs(lg[changed]) >= 1).all()
    assert (lb[~changed] == 0).all() and (lg[~changed] == 0).all()
    # Each gene belongs to at most one program and never to the cell-cycle set.
    assert (changed.sum(1) <= 1).all()
    assert not (changed.any(1) & a.var["cell_cycle_gene"].to_numpy()).any()
    prog_kinds = a.uns["simulation"]["program_kinds"]
    for p, kind in enumerate(prog_kinds):
        used = {names[k] for k in kinds[:, p] if k}
        assert used == (set(three) if kind == "mixed" else {kind})


def _z(sample, expected, sd, n):
    return (sample - expected) / (sd / np.sqrt(n))


def test_exact_bursty_moments_without_capture_noise():
    # Fixed capture, no cell cycle: genes outside the programs are i.i.d. bursty draws
    # with b = capture x base b, so the scheme's closed-form moments must hold.
    a = datasets.simulate_perturbseq(
        n_cells=3000, n_genes=60, seed=1, capture_sigma=0.0, cell_cycle_fraction=0.0,
        genes_per_program=2, doublet_fraction=0.0,
    )
    free = (a.varm["effect_kind"] == 0).all(1)
    b = a.var["burst_size"].to_numpy()[free] * a.uns["simulation"]["capture_median"]
    beta = a.var["splicing_rate"].to_numpy()[free]
    gamma = a.var["degradation_rate"].to_numpy()[free]
    n = a.layers["unspliced"].toarray()[:, free].astype(float)
    m = a.layers["spliced"].toarray()[:, free].astype(float)
    en, em = b / beta, b / gamma
    vn, vm = en * (1 + b), em * (1 + b * beta / (beta + gamma))
    cov = b**2 / (beta + gamma)
    assert np.abs(_z(n.mean(0), en, np.sqrt(vn), 3000)).max() < 4.5
    assert np.abs(_z(m.mean(0), em, np.sqrt(vm), 3000)).max() < 4.5
    # Variances and covariance: relative errors, looser (heavy tails at large b).
    np.testing.assert_allclose(n.var(0), vn, rtol=0.25)
    np.testing.assert_allclose(m.var(0), vm, rtol=0.25)
    emp_cov = ((n - n.mean(0)) * (m - m.mean(0))).mean(0)
    assert np.corrcoef(emp_cov, cov)[0, 1] > 0.95


def test_program_effects_and_cell_cycle_in_counts():
    a = datasets.simulate_perturbseq(
        n_cells=2400, n_genes=200, seed=2, capture_sigma=0.0, genes_per_program=12,
        program_kinds=["compensatory", "burst_size", "degradation"], n_programs=3,
        burst_size_range=(3.0, 10.0), degradation_range=(0.3, 1.0), doublet_fraction=0.0,
    )
    n = a.layers["unspliced"].toarray().astype(float)
    m = a.layers["spliced"].toarray().astype(float)
    ctrl = (a.obs["program"] == "control").to_numpy()
    for p, kind in enumerate(a.uns["simulation"]["program_kinds"]):
        cells = (a.obs["program"] == f"program{p + 1}").to_numpy()
        genes = a.varm["effect_kind"][:, p] > 0
        lb = a.varm["log2_b_change"][genes, p]
        lg = a.varm["log2_gamma_change"][genes, p]
        lfc_n = np.log2(n[cells][:, genes].mean(0) / n[ctrl][:, genes].mean(0))
        lfc_m = np.log2(m[cells][:, genes].mean(0) / m[ctrl][:, genes].mean(0))
        # Perturbation strengths are within [0.8, 1.2] of the program's change.
        want_n, want_m = lb, lb - lg  # mu_N = b / beta, mu_M = b / gamma
        assert np.all(np.abs(lfc_n - want_n) <= 0.25 * np.abs(want_n) + 0.35), kind
        assert np.all(np.abs(lfc_m - want_m) <= 0.25 * np.abs(want_m) + 0.35), kind
        if kind == "compensatory":
            assert np.abs(lfc_m).max() < 0.35 and np.abs(lfc_n).min() > 0.6
    # Cell cycle acts on all cells, controls included: S-type genes up in S.
    cc = a.var["cell_cycle_log2_S"].to_numpy() > 0
    s_cells = ctrl & (a.obs["phase"] == "S").to_numpy()
    g1_cells = ctrl & (a.obs["phase"] == "G1").to_numpy()
    lfc = np.log2(m[s_cells][:, cc].mean(0) / m[g1_cells][:, cc].mean(0))
    np.testing.assert_allclose(lfc, a.var["cell_cycle_log2_S"].to_numpy()[cc], atol=0.6)


def test_reproducible_and_knobs():
    kw = dict(n_cells=120, n_genes=40, genes_per_program=2)
    a1 = datasets.simulate_perturbseq(seed=5, **kw)
    a2 = datasets.simulate_perturbseq(seed=5, **kw)
    a3 = datasets.simulate_perturbseq(seed=6, **kw)
    assert (a1.layers["unspliced"] != a2.layers["unspliced"]).nnz == 0
    assert (a1.layers["spliced"] != a3.layers["spliced"]).nnz > 0
    assert (a1.varm["log2_frequency_change"] == 0).all()
    mis = datasets.simulate_perturbseq(
        seed=5, frequency_log2=1.0, cell_cycle_mode="burst_frequency", **kw
    )
    assert (np.abs(mis.varm["log2_frequency_change"][mis.varm["effect_kind"] > 0]) == 1).all()
    custom = datasets.simulate_perturbseq(seed=5, control_label="NTC", **kw)
    assert "NTC" in set(custom.obs["perturbation"])


def test_simulator_errors():
    with pytest.raises(ValueError, match="program_kinds has 2 entries"):
        datasets.simulate_perturbseq(n_cells=50, n_genes=50, program_kinds=["mixed", "mixed"])
    with pytest.raises(ValueError, match="unknown program kind"):
        datasets.simulate_perturbseq(n_cells=50, n_genes=50, n_programs=1, program_kinds=["x"])
    with pytest.raises(ValueError, match="do not fit"):
        datasets.simulate_perturbseq(n_cells=50, n_genes=50, genes_per_program=20)
    with pytest.raises(ValueError, match="cell_cycle_mode"):
        datasets.simulate_perturbseq(n_cells=50, n_genes=50, cell_cycle_mode="fast")


def test_read_h5ad_and_layer_aliases(tmp_path, screen):
    path = tmp_path / "kb.h5ad"
    b = screen[:20].copy()
    b.layers["nascent"] = b.layers.pop("unspliced")
    b.layers["mature"] = b.layers.pop("spliced")
    b.write_h5ad(path)
    r = datasets.read(path)
    assert {"unspliced", "spliced"} <= set(r.layers.keys())
    assert (r.layers["unspliced"] != screen[:20].layers["unspliced"]).nnz == 0
    with pytest.raises(FileNotFoundError, match="no such file"):
        datasets.read(tmp_path / "missing.h5ad")
    with pytest.raises(ValueError, match="expected a .h5ad or .loom"):
        (tmp_path / "x.csv").write_text("1")
        datasets.read(tmp_path / "x.csv")
    c = screen[:5].copy()
    del c.layers["unspliced"]
    c.write_h5ad(tmp_path / "nou.h5ad")
    with pytest.raises(ValueError, match="no 'unspliced' layer"):
        datasets.read(tmp_path / "nou.h5ad")
    assert isinstance(r, ad.AnnData)


def test_read_velocyto_style_loom(tmp_path):
    """A loom as velocyto writes it (genes x cells, ``Gene``/``CellID`` attributes) reads back
    with the same counts, names and layers."""
    loompy = pytest.importorskip("loompy")
    rng = np.random.default_rng(0)
    spliced = rng.poisson(3.0, (6, 4))  # genes x cells, as loom stores them
    unspliced = rng.poisson(1.0, (6, 4))
    genes = [f"Gene{i}" for i in range(6)]
    cells = [f"sample:cell{j}" for j in range(4)]
    path = tmp_path / "velocyto.loom"
    loompy.create(
        str(path),
        {"": spliced + unspliced, "spliced": spliced, "unspliced": unspliced},
        row_attrs={"Gene": np.array(genes)},
        col_attrs={"CellID": np.array(cells)},
    )
    adata = datasets.read(path)
    assert list(adata.obs_names) == cells and list(adata.var_names) == genes
    for layer, expected in (("spliced", spliced), ("unspliced", unspliced)):
        got = adata.layers[layer]
        got = got.toarray() if hasattr(got, "toarray") else np.asarray(got)
        np.testing.assert_array_equal(got, expected.T)
