"""Bayes-factor maths against analytic cases, and the model-facing tests on tiny fits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from pybivi import datasets, report
from pybivi.tl import de


def _two_sided(m: float, s: float, delta: float) -> float:
    """P(|X| >= delta) for X ~ N(m, s^2)."""
    return norm.cdf((-delta - m) / s) + norm.sf((delta - m) / s)


@pytest.mark.parametrize("shift", [0.0, 0.8, 1.5, -2.5])
def test_kinetic_bf_matches_lognormal_closed_form(shift):
    # log2 a ~ N(shift, 0.6^2), log2 b ~ N(0, 0.6^2): lfc ~ N(shift, 2 * 0.36).
    rng = np.random.default_rng(1)
    s = 0.6
    a = 2.0 ** rng.normal(shift, s, size=(4000, 3))
    b = 2.0 ** rng.normal(0.0, s, size=(3000, 3))
    res = de.kinetic_bayes_factors(a, b, delta=1.0, n_pairs=20_000, seed=3)
    p = _two_sided(shift, s * np.sqrt(2), 1.0)
    mc_sd = np.sqrt(p * (1 - p) / 20_000) + 0.01  # pairs + finite pools
    np.testing.assert_allclose(res["proba_de"], p, atol=4 * mc_sd)
    np.testing.assert_allclose(res["lfc_mean"], shift, atol=0.05)
    np.testing.assert_allclose(res["lfc_sd"], s * np.sqrt(2), rtol=0.05)
    # BF is the pair-count ratio with the documented half pseudo-count.
    n_out = res["proba_de"] * 20_000
    np.testing.assert_allclose(res["bayes_factor"], (n_out + 0.5) / (20_000 - n_out + 0.5))


def test_kinetic_bf_is_seeded_and_pairs_are_random():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(size=(500, 4)), rng.lognormal(size=(700, 4))
    r1 = de.kinetic_bayes_factors(a, b, n_pairs=1000, seed=5)
    r2 = de.kinetic_bayes_factors(a, b, n_pairs=1000, seed=5)
    r3 = de.kinetic_bayes_factors(a, b, n_pairs=1000, seed=6)
    np.testing.assert_array_equal(r1["bayes_factor"], r2["bayes_factor"])
    assert not np.array_equal(r1["lfc_mean"], r3["lfc_mean"])


def test_kinetic_bf_extremes_are_finite():
    a = np.full((100, 2), 8.0)
    b = np.full((100, 2), 1.0)
    res = de.kinetic_bayes_factors(a, b, delta=1.0, n_pairs=1000)
    np.testing.assert_allclose(res["bayes_factor"], 1000.5 / 0.5)
    res = de.kinetic_bayes_factors(b, b, delta=1.0, n_pairs=1000)
    np.testing.assert_allclose(res["bayes_factor"], 0.5 / 1000.5)


def test_kinetic_bf_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        de.kinetic_bayes_factors(np.zeros((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="gene axes"):
        de.kinetic_bayes_factors(np.ones((3, 2)), np.ones((3, 3)))


@pytest.mark.parametrize("shift", [0.1, 0.5, -0.4])
def test_change_mode_matches_closed_form(shift):
    # With eps = 0, lfc of element-wise pairs of independent lognormals is N(shift, 2 s^2).
    rng = np.random.default_rng(2)
    s, n, delta = 0.3, 20_000, 0.2
    a = 2.0 ** rng.normal(shift, s, size=(n, 2))
    b = 2.0 ** rng.normal(0.0, s, size=(n, 2))
    res = de.change_bayes_factors(a, b, delta=delta, pseudocounts=0.0)
    sd = s * np.sqrt(2)
    p = max(norm.sf((delta - shift) / sd), norm.cdf((-delta - shift) / sd))
    np.testing.assert_allclose(res["proba_de"], p, atol=4 * np.sqrt(p * (1 - p) / n))
    np.testing.assert_allclose(
        res["bayes_factor"], res["proba_de"] / (1 - res["proba_de"]), rtol=1e-6
    )
    np.testing.assert_allclose(res["log_bayes_factor"], np.log(res["bayes_factor"]))
    assert np.all(res["direction"] == np.sign(shift))


def test_change_mode_pseudocount_shrinks_silent_genes():
    # Two silent genes with a 10x ratio of tiny scales: eps above them removes the call.
    a = np.full((200, 1), 1e-7)
    b = np.full((200, 1), 1e-8)
    assert de.change_bayes_factors(a, b, pseudocounts=0.0)["proba_de"][0] == 1.0
    assert de.change_bayes_factors(a, b, pseudocounts=1e-4)["proba_de"][0] == 0.0


def test_estimate_pseudocounts_uses_silent_genes_quantile():
    scales_a = np.tile(np.array([1e-3, 2e-3, 0.5]), (10, 1))
    zero = np.array([True, True, False])
    # Largest max-scale among the two silent genes (quantile 1), over the 3 genes.
    eps = de.estimate_pseudocounts(scales_a, scales_a, zero, zero, quantile=1.0)
    assert eps == pytest.approx(2e-3 / 3)
    none = np.zeros(3, bool)
    assert de.estimate_pseudocounts(scales_a, scales_a, none, none) == 1e-10


def test_combined_call_labels():
    calls = {"burst_size": np.array([1, 0, 1, 0]), "degradation_rate": np.array([0, 1, 1, 0])}
    out = de.combined_call(calls)
    assert list(out) == ["burst_size only", "degradation_rate only", "both", "none"]


# ----------------------------------------------------------------- InferenceData input
def _synthetic_idata(rng, shifts_b, shifts_g, n_cells=60, n_draws=50, s=0.4):
    """Reference-library draws: log2 params ~ N(shift * [cell in program1], s^2)."""
    import arviz as az
    import xarray as xr

    labels = np.array(["control"] * (n_cells // 2) + ["program1"] * (n_cells - n_cells // 2))
    prog = (labels == "program1")[None, None, :, None]
    n_genes = len(shifts_b)
    shape = (1, n_draws, n_cells, n_genes)
    post = {}
    for name, shifts in (("burst_size", shifts_b), ("degradation_rate", shifts_g)):
        log2 = rng.normal(0.0, s, shape) + prog * np.asarray(shifts)[None, None, None, :]
        post[name] = (("chain", "draw", "cell", "gene"), 2.0**log2)
    post["mean_mature"] = (("chain", "draw", "cell", "gene"), 100 * post["burst_size"][1])
    genes = [f"g{i}" for i in range(n_genes)]
    coords = {"chain": [0], "draw": np.arange(n_draws), "cell": np.arange(n_cells), "gene": genes}
    const = xr.Dataset(
        {
            "program": (("cell",), labels),
            "is_control": (("cell",), labels == "control"),
            "reference_library_mature": ((), 1000.0),
        },
        coords={"cell": np.arange(n_cells)},
    )
    return az.InferenceData(posterior=xr.Dataset(post, coords=coords), constant_data=const)


def test_kinetic_from_inference_data_matches_closed_form():
    rng = np.random.default_rng(4)
    shifts_b, shifts_g = [3.0, 0.0, 2.5, 0.0, 0.7], [0.0, -3.0, 2.5, 0.0, 0.0]
    idata = _synthetic_idata(rng, shifts_b, shifts_g)
    table = de.kinetic(
        idata, groupby="program", reference="control", method="pairs", n_pairs=20_000
    )
    assert list(table["group"].unique()) == ["program1"]
    assert list(table["call"]) == [
        "burst_size only",
        "degradation_rate only",
        "both",
        "none",
        "none",
    ]
    for name, shifts in (("burst_size", shifts_b), ("degradation_rate", shifts_g)):
        p = np.array([_two_sided(m, 0.4 * np.sqrt(2), 1.0) for m in shifts])
        np.testing.assert_allclose(table[f"{name}_proba_de"], p, atol=0.03)
        np.testing.assert_allclose(table[f"{name}_lfc_mean"], shifts, atol=0.08)


def test_kinetic_median_ratio_removes_a_shift_shared_by_every_gene():
    """A compositional shift of every gene of one group (here 0.8 log2) is taken out by
    ``normalize="median_ratio"`` when most genes do not change, and only then."""
    rng = np.random.default_rng(7)
    shifts = [2.5, -2.5, 2.0] + [0.0] * 18
    idata = _synthetic_idata(rng, shifts, [0.0] * len(shifts), s=0.3)
    in_group = (idata.constant_data["program"] == "program1").values
    for name in ("burst_size", "degradation_rate"):
        idata.posterior[name].values[:, :, in_group, :] *= 2.0**0.8
    plain = de.kinetic(
        idata, groupby="program", reference="control", method="pairs", n_pairs=20_000
    )
    fixed = de.kinetic(
        idata,
        groupby="program",
        reference="control",
        method="pairs",
        n_pairs=20_000,
        normalize="median_ratio",
    )
    np.testing.assert_allclose(plain["burst_size_lfc_mean"], np.add(shifts, 0.8), atol=0.1)
    np.testing.assert_allclose(fixed["burst_size_lfc_mean"], shifts, atol=0.15)
    np.testing.assert_allclose(fixed["degradation_rate_lfc_mean"], 0.0, atol=0.15)
    assert list(fixed["burst_size_is_de"]) == [True] * 3 + [False] * 18


def test_mean_from_inference_data_uses_normalised_expression():
    rng = np.random.default_rng(5)
    idata = _synthetic_idata(rng, [0.5, 0.0], [0.0, 0.0], n_draws=100)
    table = de.mean(idata, groupby="program", reference="control", method="pairs", n_samples=3000)
    # rho = mean_mature / reference library = b / 10: same lfc law as b.
    sd, delta = 0.4 * np.sqrt(2), 0.2
    expected = [max(norm.sf((delta - m) / sd), norm.cdf((-delta - m) / sd)) for m in (0.5, 0.0)]
    np.testing.assert_allclose(table["proba_de"], expected, atol=0.03)
    np.testing.assert_allclose(
        table["scale_group"].iloc[0] / table["scale_reference"].iloc[0], 2**0.5 * 1.0, rtol=0.1
    )
    assert table["is_de"].tolist() == list(table["bayes_factor"] > 2)


def test_group_errors():
    idata = _synthetic_idata(np.random.default_rng(0), [0.0], [0.0])
    with pytest.raises(ValueError, match="reference"):
        de.kinetic(idata, reference="nope")
    with pytest.raises(ValueError, match="no cells"):
        de.kinetic(idata, group="program9")
    with pytest.raises(KeyError, match="constant_data"):
        de.kinetic(idata, groupby="phase")


# ---------------------------------------------------------------------- fitted models
@pytest.fixture(scope="module")
def sim():
    import torch

    from pybivi import datasets

    torch.set_num_threads(1)
    return datasets.simulate_perturbseq(
        n_cells=240, n_genes=30, n_programs=2, seed=0, genes_per_program=6
    )


@pytest.fixture(scope="module")
def bursty_and_scvi(sim):
    from pybivi.models import SCVI, ContrastiveBiVI

    a = sim.copy()
    ContrastiveBiVI.setup_anndata(a, perturbation_key="perturbation", control_labels="NT")
    # Untrained is enough for the wiring: draws only decode (no CME likelihood needed).
    cbivi = ContrastiveBiVI(a, scheme="bursty", n_hidden=16, seed=3)
    b = sim.copy()
    SCVI.setup_anndata(b, perturbation_key="perturbation", control_labels="NT")
    scvi = SCVI(b, n_hidden=16, seed=3)
    scvi.train(max_epochs=2, batch_size=64, progress_bar=False)
    return cbivi, scvi


def test_model_and_inference_data_paths_agree(bursty_and_scvi):
    from pybivi import posterior

    cbivi, _ = bursty_and_scvi
    kw = dict(
        groupby="program", group="program1", reference="control", method="pairs", n_pairs=20_000
    )
    direct = de.kinetic(cbivi, n_samples=4000, seed=1, **kw)
    idata = posterior.posterior(
        cbivi,
        n_samples=40,
        groupby="program",
        groups=["program1", "control"],
        libraries=("reference",),
        quantities=("burst_size", "degradation_rate"),
        seed=2,
    )
    exported = de.kinetic(idata, **kw)
    # Two independent Monte Carlo estimates of the same posterior probabilities.
    for p in ("burst_size", "degradation_rate"):
        np.testing.assert_allclose(direct[f"{p}_proba_de"], exported[f"{p}_proba_de"], atol=0.04)
        np.testing.assert_allclose(direct[f"{p}_lfc_mean"], exported[f"{p}_lfc_mean"], atol=0.1)
    again = de.kinetic(cbivi, n_samples=4000, seed=1, **kw)
    pd.testing.assert_frame_equal(direct, again)


def test_all_groups_at_once_and_mean_on_scvi(bursty_and_scvi, sim):
    cbivi, scvi = bursty_and_scvi
    table = de.kinetic(cbivi, groupby="program", method="pairs", n_samples=500, n_pairs=2000)
    expected = sorted(set(sim.obs["program"].astype(str)) - {"control"})
    assert sorted(table["group"].unique()) == expected
    assert len(table) == len(expected) * sim.n_vars
    m = de.mean(
        scvi, groupby="program", group=["program1", "program2"], method="pairs", n_samples=500
    )
    assert set(m["group"]) == {"program1", "program2"}
    assert np.all(m["pseudocounts"] >= 1e-10)
    with pytest.raises(ValueError, match="reaction scheme"):
        de.kinetic(scvi, groupby="program")


def test_truth_scores_by_construction(sim):
    genes = list(sim.var_names)
    true_b = np.abs(sim.varm["log2_b_change"][:, 0]) >= 1
    true_g = np.abs(sim.varm["log2_gamma_change"][:, 0]) >= 1
    table = pd.DataFrame(
        {
            "group": "program1",
            "burst_size_is_de": true_b,
            "degradation_rate_is_de": np.ones(30, bool),
        },
        index=pd.Index(genes, name="gene"),
    )
    table["call"] = de.combined_call(
        {
            "burst_size": table["burst_size_is_de"],
            "degradation_rate": table["degradation_rate_is_de"],
        }
    )
    scores = datasets.truth_scores(table, sim).set_index("target")
    assert (
        scores.loc["burst_size", "precision"] == 1.0 and scores.loc["burst_size", "recall"] == 1.0
    )
    assert scores.loc["degradation_rate", "precision"] == pytest.approx(true_g.mean())
    assert scores.loc["degradation_rate", "recall"] == 1.0
    mean_table = pd.DataFrame({"group": "program1", "is_de": np.zeros(30, bool)}, index=genes)
    comp = datasets.compensatory_summary(table, mean_table, sim).iloc[0]
    n_comp = int(np.sum(sim.varm["effect_kind"][:, 0] == 3))
    assert comp["n_compensatory"] == n_comp and comp["kinetic_not_mean"] == n_comp


def test_figure3_section(bursty_and_scvi, sim):
    cbivi, scvi = bursty_and_scvi
    out = report.figure3(cbivi, scvi=scvi, truth=sim, n_samples=300)
    counts, overlap = out["counts"], out["overlap"]
    assert list(counts.index) == ["program1", "program2"]
    # Diagonal of the overlap = total calls of each kind over programs.
    for col in ("b", "gamma/k", "mean (counts)"):
        assert overlap.loc[col, col] == counts[col].sum()
    assert set(out["figures"]) == {"counts", "overlap", "densities"}
    assert out["gene"] in sim.var_names and "Compensatory" in out["text"]
    assert len(out["figures"]["densities"].axes) == 3
    assert "null call rate" in out["text"].lower() and "FDR" in out["text"]
    paper = report.figure3(cbivi, scvi=scvi, truth=sim, n_samples=300, method="pairs")
    assert "mean (SCVI)" in paper["counts"].columns and "BF > 3" in paper["text"]


def test_kinetic_and_mean_share_their_parameter_texts():
    """The weights/responders and transform_batch texts are written once, for both tests."""
    assert de.__all__ == ["kinetic", "mean", "group_test", "GROUP_DELTA", "call_counts",
                          "overlap_table"]
    for name in ("weights, responders\n", "transform_batch\n"):
        texts = [doc[doc.index(name):].split("\n    batch_size")[0].split("\n\n")[0]
                 for doc in (de.kinetic.__doc__, de.mean.__doc__)]
        assert texts[0] == texts[1] and len(texts[0].splitlines()) > 3
    assert "{" not in de.kinetic.__doc__ and "{" not in de.mean.__doc__
