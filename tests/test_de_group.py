"""The group-level differential tests: FDR rule, three-way test, shrinkage, sampling
variances, calibration on planted data, the paper's mode, and a small end-to-end fit."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from pybivi.tl import de
from pybivi.tl._de_streams import SPECIES, group_log2_draws, pseudobulk_moments
from pybivi.tl.bayes_factors import fdr_calls, shrink_lfc, three_way_test


# ------------------------------------------------------------------------ pure maths
def test_fdr_calls_is_the_largest_admissible_set():
    rng = np.random.default_rng(0)
    for _ in range(30):
        p = rng.choice([0.0, 0.3, 0.7, 0.9, 0.95, 0.99, 1.0], size=7)
        calls = fdr_calls(p, 0.05)
        # Brute force over every subset: the called set is admissible and no larger
        # admissible set exists.
        best = 0
        for k in range(1, 8):
            for subset in itertools.combinations(range(7), k):
                if np.mean(1 - p[list(subset)]) <= 0.05 + 1e-12:
                    best = max(best, k)
        assert calls.sum() == best
        if calls.any():
            assert np.mean(1 - p[calls]) <= 0.05 + 1e-12
            assert p[calls].min() >= p[~calls].max(initial=0.0)
        perm = rng.permutation(7)
        assert calls.sum() == fdr_calls(p[perm], 0.05).sum()
    assert not fdr_calls(np.zeros(5)).any() and fdr_calls(np.zeros(5), 1.0).all()
    with pytest.raises(ValueError, match="fdr_target"):
        fdr_calls(np.ones(3), 1.5)
    with pytest.raises(ValueError, match="proba_de"):
        fdr_calls(np.array([0.5, 1.2]))


def test_fdr_calls_bound_the_realised_fdr_of_calibrated_posteriors():
    """Genes are truly differential with their posterior probability: the realised
    false-discovery proportion of the calls averages at most the target."""
    rng = np.random.default_rng(1)
    fdps = []
    for _ in range(400):
        p = rng.beta(0.3, 0.3, size=200)
        truth = rng.random(200) < p
        calls = fdr_calls(p, 0.1)
        if calls.any():
            fdps.append(np.mean(~truth[calls]))
    assert np.mean(fdps) <= 0.1


@pytest.mark.parametrize("m", [0.0, 0.4, -1.2])
def test_three_way_test_matches_the_normal_closed_form(m):
    s, delta = 0.3, 0.5
    draws = np.random.default_rng(2).normal(m, s, size=(200_000, 1))
    res = three_way_test(draws, delta, credible_mass=0.9)
    up, down = norm.sf((delta - m) / s), norm.cdf((-delta - m) / s)
    assert res["proba_up"][0] == pytest.approx(up, abs=0.005)
    assert res["proba_down"][0] == pytest.approx(down, abs=0.005)
    assert res["proba_null"][0] == pytest.approx(1 - up - down, abs=0.005)
    assert res["lfc_low"][0] == pytest.approx(m - 1.6449 * s, abs=0.01)
    assert res["lfc_high"][0] == pytest.approx(m + 1.6449 * s, abs=0.01)
    n_de = res["proba_de"][0] * draws.shape[0]
    assert res["bayes_factor"][0] == pytest.approx((n_de + 0.5) / (draws.shape[0] - n_de + 0.5))


def test_shrink_lfc_learns_the_null_share_and_calls_with_error_control():
    rng = np.random.default_rng(3)
    n = 2000
    truth = np.where(rng.random(n) < 0.9, 0.0, rng.normal(0.0, 2.0, n))
    se = rng.uniform(0.1, 0.8, n)
    estimate = truth + se * rng.standard_normal(n)
    draws, fit = shrink_lfc(estimate, se, seed=4)
    # The point mass and scales far below every standard error cannot be told apart:
    # their joint prior mass is the null share.
    near_zero = fit["weights"][fit["scales"] <= 0.05].sum()
    assert fit["scales"][0] == 0 and near_zero == pytest.approx(0.9, abs=0.04)
    res = three_way_test(draws, 0.5)
    calls = fdr_calls(res["proba_de"], 0.05)
    assert np.mean(np.abs(truth[calls]) < 0.5) <= 0.08
    assert np.mean(calls[np.abs(truth) > 2.0]) >= 0.8
    # The flat prior calls noisy null genes: many more false calls.
    flat = three_way_test(estimate + se * rng.standard_normal((1000, n)), 0.5)
    flat_calls = fdr_calls(flat["proba_de"], 0.05)
    assert np.sum(flat_calls & (truth == 0)) > 3 * max(1, np.sum(calls & (truth == 0)))
    with pytest.raises(ValueError, match="lfc_se"):
        shrink_lfc(estimate, np.zeros(n))


# ---------------------------------------------------------------- planted count data
def _planted_idata(rng, b_log2, gamma_log2, n_ref=600, n_group=300, n_genes=200):
    """Counts of a control group and one perturbed group with planted kinetic changes.

    Bursty steady state: nascent mean ``b / beta``, mature ``b / gamma``; the group's
    ``b`` and ``gamma`` are the control's times ``2**b_log2`` and ``2**gamma_log2``.
    Negative-binomial counts, scaled by a per-cell capture.
    """
    import arviz as az
    import xarray as xr

    b = rng.uniform(0.5, 5.0, n_genes)
    beta, gamma = rng.uniform(0.5, 2.0, n_genes), rng.uniform(0.2, 2.0, n_genes)
    labels = np.array(["control"] * n_ref + ["g1"] * n_group)
    in_group = labels == "g1"
    bb = b[None, :] * np.where(in_group[:, None], 2.0 ** np.asarray(b_log2), 1.0)
    gg = gamma[None, :] * np.where(in_group[:, None], 2.0 ** np.asarray(gamma_log2), 1.0)
    capture = rng.lognormal(np.log(0.3), 0.3, labels.size)[:, None]
    x = np.stack(
        [
            rng.negative_binomial(2.0, 2.0 / (2.0 + capture * bb / beta)),
            rng.negative_binomial(2.0, 2.0 / (2.0 + capture * bb / gg)),
        ],
        axis=-1,
    ).astype(np.float32)
    lib = x.sum(1)
    genes = [f"g{i}" for i in range(n_genes)]
    cells = np.arange(labels.size)
    post = xr.Dataset(
        {"mean_nascent": (("chain", "draw", "cell", "gene"), np.ones((1, 2, cells.size, n_genes)))},
        coords={"cell": cells, "gene": genes},
        attrs={"scheme": "bursty"},
    )
    const = xr.Dataset(
        {
            "program": (("cell",), labels),
            "is_control": (("cell",), ~in_group),
            "library_nascent": (("cell",), lib[:, 0]),
            "library_mature": (("cell",), lib[:, 1]),
            "reference_library_nascent": ((), float(np.median(lib[:, 0]))),
            "reference_library_mature": ((), float(np.median(lib[:, 1]))),
            "theta": (("gene",), 1.0 / beta),
        },
        coords={"cell": cells, "gene": genes},
    )
    observed = xr.Dataset(
        {"x": (("cell", "gene", "species"), x)},
        coords={"cell": cells, "gene": genes, "species": ["nascent", "mature"]},
    )
    return az.InferenceData(posterior=post, constant_data=const, observed_data=observed)


@pytest.mark.parametrize("library_weighted", [True, False])
def test_pseudobulk_moments_are_the_normalised_means_and_their_sampling_variance(
    library_weighted,
):
    rng = np.random.default_rng(5)
    idata = _planted_idata(rng, np.zeros(50), np.zeros(50), n_ref=6000, n_group=10, n_genes=50)
    x = idata.observed_data["x"].values.astype(float)
    const = idata.constant_data
    sets = {f"r{i}": np.arange(i * 200, (i + 1) * 200) for i in range(30)}
    moments = pseudobulk_moments(idata, sets, batch_size=64, library_weighted=library_weighted)
    for i, s in enumerate(("nascent", "mature")):
        ref, lib = float(const[f"reference_library_{s}"]), const[f"library_{s}"].values
        counts, sizes = x[600:800, :, i], lib[600:800]
        expected = (
            counts.sum(0) / sizes.sum() * ref  # summed counts over summed libraries
            if library_weighted
            else (counts / sizes[:, None] * ref).mean(0)  # mean of the normalised counts
        )
        np.testing.assert_allclose(moments["r3"][f"mean_{s}"], expected)
    # The variances of the logs against their spread over the thirty disjoint sets.
    logs = {s: np.array([np.log(moments[k][f"mean_{s}"]) for k in sets]) for s in SPECIES}
    expressed = np.all([logs[s].mean(0) > np.log(0.2) for s in SPECIES], axis=0)
    for s in SPECIES:
        predicted = np.mean([moments[k][f"var_log_{s}"] for k in sets], axis=0)
        ratio = np.median(logs[s].var(0, ddof=1)[expressed] / predicted[expressed])
        assert 0.8 < ratio < 1.2


def test_summed_pseudobulk_is_the_more_precise_for_poisson_counts():
    """With unequal libraries and Poisson-like counts, summed counts over summed libraries
    (the maximum-likelihood mean) vary less than the mean of the cells' ratios."""
    rng = np.random.default_rng(7)
    idata = _planted_idata(rng, np.zeros(40), np.zeros(40), n_ref=4000, n_group=10, n_genes=40)
    sets = {f"r{i}": np.arange(i * 200, (i + 1) * 200) for i in range(20)}
    spread = {}
    for weighted in (True, False):
        moments = pseudobulk_moments(idata, sets, batch_size=128, library_weighted=weighted)
        logs = np.array([np.log(moments[k]["mean_nascent"]) for k in sets])
        spread[weighted] = np.median(logs.var(0, ddof=1))
    assert spread[True] < spread[False]


def test_group_test_finds_planted_kinetic_changes_and_only_them():
    rng = np.random.default_rng(6)
    n = 200
    b_log2, gamma_log2 = np.zeros(n), np.zeros(n)
    b_log2[:20] = gamma_log2[:20] = 1.5  # compensatory: nascent up, mature flat
    gamma_log2[20:40] = -1.5  # degradation only: mature up
    b_log2[40:60] = -1.5  # burst size only: both species down
    idata = _planted_idata(rng, b_log2, gamma_log2)
    table = de.kinetic(idata, groupby="program", seed=1)
    called_b = table["burst_size_is_de"].to_numpy()
    called_g = table["degradation_rate_is_de"].to_numpy()
    true_b, true_g = b_log2 != 0, gamma_log2 != 0
    # Precision >= 0.9 of each parameter's calls (FDR target 0.05), recall >= 0.9.
    assert np.mean(true_b[called_b]) >= 0.9 and np.mean(called_b[true_b]) >= 0.9
    assert np.mean(true_g[called_g]) >= 0.9 and np.mean(called_g[true_g]) >= 0.9
    assert (table["burst_size_proba_up"].to_numpy()[:20] > 0.9).all()
    assert (table["burst_size_proba_down"].to_numpy()[40:60] > 0.9).mean() >= 0.9
    # The mean test sees the mature changes but not the compensatory genes.
    mean_table = de.mean(idata, groupby="program", seed=1)
    mean_calls = mean_table["is_de"].to_numpy()
    assert np.mean(mean_calls[20:60]) >= 0.9 and mean_calls[:20].sum() <= 1
    assert (table["burst_size_null_call_rate"] <= 0.05).all()
    # One prior per parameter finds the same changes here, where every gene is well measured.
    separate = de.kinetic(idata, groupby="program", seed=1, shrink="separate")
    for p, true in (("burst_size", true_b), ("degradation_rate", true_g)):
        called = separate[f"{p}_is_de"].to_numpy()
        assert np.mean(true[called]) >= 0.9 and np.mean(called[true]) >= 0.9
    null = table.attrs["null_call_rates"]
    assert len(null) == 3 * 2 and (null["n_cells"] == 300).all()


def test_a_null_group_gets_few_calls():
    rng = np.random.default_rng(7)
    idata = _planted_idata(rng, np.zeros(300), np.zeros(300), n_genes=300)
    table = de.kinetic(idata, groupby="program", seed=2)
    assert table["burst_size_is_de"].sum() + table["degradation_rate_is_de"].sum() <= 3
    # Without shrinkage, the flat prior's probabilities are not calibrated across genes,
    # and the control-versus-control splits say so.
    with pytest.warns(UserWarning, match="not calibrated"):
        flat = de.kinetic(idata, groupby="program", seed=2, shrink=False, delta=0.2, fdr_target=0.2)
    assert flat["burst_size_is_de"].sum() > table["burst_size_is_de"].sum()


def test_median_ratio_removes_the_compositional_shift_of_a_strong_program():
    rng = np.random.default_rng(9)
    n = 200
    b_log2 = np.zeros(n)
    b_log2[:30] = 3.0  # 30 genes x8: every other gene's share of the library falls
    idata = _planted_idata(rng, b_log2, b_log2, n_genes=n)
    kw = dict(groupby="program", seed=4, null_repeats=0)
    raw = de.kinetic(idata, **kw)["burst_size_lfc_estimate"].to_numpy()
    fixed = de.kinetic(idata, normalize="median_ratio", **kw)["burst_size_lfc_estimate"]
    assert np.median(raw[30:]) < -0.3
    assert abs(np.median(fixed.to_numpy()[30:])) < 0.05
    np.testing.assert_allclose(np.median(fixed.to_numpy()[:30]), 3.0, atol=0.3)


def test_group_test_errors():
    rng = np.random.default_rng(8)
    idata = _planted_idata(rng, np.zeros(20), np.zeros(20), n_genes=20)
    with pytest.raises(ValueError, match="estimate"):
        de.kinetic(idata, groupby="program", estimate="nope")
    with pytest.raises(ValueError, match="method"):
        de.kinetic(idata, groupby="program", method="nope")
    with pytest.raises(ValueError, match="delta"):
        de.kinetic(idata, groupby="program", delta=-1.0)
    with pytest.raises(ValueError, match="shrink"):
        de.kinetic(idata, groupby="program", shrink="nope")
    # beta/k is one value per gene: testing it under no_grad gives no call, not an error.
    import torch

    with torch.no_grad():
        fixed = de.kinetic(idata, groupby="program", params=["splicing_rate"], null_repeats=0)
    assert not fixed["splicing_rate_is_de"].any()
    np.testing.assert_allclose(fixed["splicing_rate_lfc_estimate"], 0.0, atol=1e-12)
    del idata.posterior.attrs["scheme"]
    with pytest.raises(ValueError, match="scheme"):
        de.kinetic(idata, groupby="program")


# ---------------------------------------------------------------------- fitted models
@pytest.fixture(scope="module")
def fitted():
    """A small screen with one compensatory program, fitted end to end."""
    import torch

    from pybivi import datasets
    from pybivi.models import ContrastiveBiVI

    torch.set_num_threads(1)
    adata = datasets.simulate_perturbseq(
        n_cells=900,
        n_genes=60,
        n_programs=1,
        program_kinds=["compensatory"],
        genes_per_program=12,
        effect_range=(1.5, 2.0),
        doublet_fraction=0.0,
        seed=11,
    )
    ContrastiveBiVI.setup_anndata(adata, perturbation_key="perturbation", control_labels="NT")
    model = ContrastiveBiVI(adata, n_hidden=32, seed=0)
    model.train(max_epochs=8, batch_size=128, progress_bar=False, seed=0)
    return model, adata


def test_a_fit_recovers_a_compensatory_change_that_the_mean_test_misses(fitted):
    model, adata = fitted
    table = de.kinetic(model, groupby="program", group="program1", seed=0)
    mean_table = de.mean(model, groupby="program", group="program1", seed=0)
    change = np.asarray(adata.varm["log2_b_change"])[:, 0]
    compensatory = np.abs(change) >= 1.5
    kinetic_calls = (table["call"] != "none").to_numpy()
    assert compensatory.sum() >= 8
    assert np.mean(kinetic_calls[compensatory]) >= 0.75
    assert (
        np.mean(kinetic_calls[compensatory] & ~mean_table["is_de"].to_numpy()[compensatory]) >= 0.6
    )
    assert np.sum(kinetic_calls & (change == 0)) <= 2
    signs = np.sign(table["burst_size_lfc_mean"].to_numpy()[compensatory])
    assert (signs == np.sign(change[compensatory])).mean() >= 0.9


def test_model_and_exported_paths_agree_and_decoded_means_are_group_averages(fitted):
    model, adata = fitted
    kw = dict(groupby="program", group="program1", seed=3)
    direct = de.kinetic(model, **kw)
    idata = model.posterior(n_samples=4, groupby="program", libraries=("reference",))
    exported = de.kinetic(idata, **kw)
    pd.testing.assert_frame_equal(direct, exported, check_exact=False, rtol=1e-5, atol=1e-6)
    # The decoded pseudo-bulk of a set, draw by draw, is the mean of its cells' draws.
    rows = np.flatnonzero(adata.obs["program"].astype(str).to_numpy() == "program1")
    draws = group_log2_draws(idata, {"p1": rows}, ("mean_nascent",), batch_size=50)
    cells = idata.posterior["mean_nascent"].sel(library="reference").values[0][:, rows]
    cells = cells.astype(np.float64)
    np.testing.assert_allclose(draws["p1"]["mean_nascent"], np.log2(cells.mean(1)), rtol=1e-6)
    decoded = de.kinetic(model, estimate="decoded", n_draws=10, null_repeats=1, **kw)
    assert np.isfinite(decoded["burst_size_lfc_mean"]).all()


def test_paper_mode_is_biVIs_pooled_pairs_procedure(fitted):
    """``method="pairs"`` is the documented procedure, step by step: pooled draws of the
    reference (seed), of the group (seed + 1), pairs seeded per group and parameter."""
    from pybivi.posterior import pooled_samples
    from pybivi.tl.bayes_factors import kinetic_bayes_factors

    model, adata = fitted
    labels = adata.obs["program"].astype(str).to_numpy()
    names = ("burst_size", "degradation_rate")
    table = de.kinetic(
        model, groupby="program", group="program1", method="pairs", n_samples=800, seed=5
    )
    ref = pooled_samples(model, np.flatnonzero(labels == "control"), 800, names,
                         batch_size=256, seed=5)  # fmt: skip
    grp = pooled_samples(model, np.flatnonzero(labels == "program1"), 800, names,
                         batch_size=256, seed=6)  # fmt: skip
    for j, p in enumerate(names):
        res = kinetic_bayes_factors(grp[p], ref[p], 1.0, 10_000, seed=5 + 7919 + j)
        np.testing.assert_array_equal(table[f"{p}_bayes_factor"], res["bayes_factor"])
        np.testing.assert_array_equal(table[f"{p}_is_de"], res["bayes_factor"] > 3.0)


def test_normal_mixture_tails_match_monte_carlo():
    from pybivi.tl.bayes_factors import normal_mixture_tails

    rng = np.random.default_rng(12)
    weights = np.array([[0.5, 0.3, 0.2], [0.0, 0.0, 1.0]])
    means = np.array([[0.0, 0.8, -1.5], [0.0, 0.0, 0.4]])
    sds = np.array([[0.0, 0.3, 0.6], [0.0, 0.0, 0.2]])
    up, down = normal_mixture_tails(weights, means, sds, 0.5)
    for g in range(2):
        comp = rng.choice(3, size=400_000, p=weights[g])
        x = means[g, comp] + sds[g, comp] * rng.standard_normal(comp.size)
        assert up[g] == pytest.approx(np.mean(x >= 0.5), abs=0.003)
        assert down[g] == pytest.approx(np.mean(x <= -0.5), abs=0.003)
