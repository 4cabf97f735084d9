"""Joint adaptive shrinkage of a gene's kinetic log fold changes: closed forms, Monte Carlo
and planted truth."""

import numpy as np
import pytest

from pybivi.tl._de_batches import stratified_compare, stratified_cross
from pybivi.tl._joint_shrinkage import covariance_patterns, shrink_lfc_joint
from pybivi.tl._shrinkage import fdr_calls, normal_mixture_tails, shrink_lfc


def _planted(rng, n=3000, null_share=0.8):
    """Two parameters measured with correlated errors; changed genes move both equally
    (a compensatory program), and the second parameter is the noisier one."""
    changed = rng.random(n) > null_share
    size = rng.normal(0.0, 1.5, n) * changed
    truth = np.stack([size, size], 1)
    se = np.stack([rng.uniform(0.2, 0.5, n), rng.uniform(0.4, 0.9, n)], 1)
    rho = 0.6
    cov = np.empty((n, 2, 2))
    cov[:, 0, 0], cov[:, 1, 1] = se[:, 0] ** 2, se[:, 1] ** 2
    cov[:, 0, 1] = cov[:, 1, 0] = rho * se[:, 0] * se[:, 1]
    noise = np.einsum("gpq,gq->gp", np.linalg.cholesky(cov), rng.standard_normal((n, 2)))
    return truth, truth + noise, cov


def test_one_parameter_is_ash_exactly():
    rng = np.random.default_rng(0)
    truth = np.where(rng.random(500) < 0.8, 0.0, rng.normal(0, 2, 500))
    se = rng.uniform(0.2, 0.6, 500)
    x = truth + se * rng.standard_normal(500)
    joint = shrink_lfc_joint(x[:, None], (se**2)[:, None, None])
    _, ash = shrink_lfc(x, se)
    np.testing.assert_allclose(joint["scales"], ash["scales"][1:])
    np.testing.assert_allclose(joint["posterior_weights"], ash["posterior_weights"], atol=1e-6)
    np.testing.assert_allclose(joint["component_means"][..., 0], ash["component_means"], atol=1e-6)
    np.testing.assert_allclose(joint["component_sds"][..., 0], ash["component_sds"], atol=1e-6)


def test_component_posteriors_are_the_conjugate_normal_ones():
    truth, x, cov = _planted(np.random.default_rng(1), n=200)
    fit = shrink_lfc_joint(x, cov)
    # Components: the point mass, then every pattern at every scale. The identity pattern
    # is full rank: posterior precision = prior precision + data precision.
    identity = [np.allclose(p, np.eye(2)) for p in fit["patterns"]].index(True)
    scale = 3
    k = 1 + identity * len(fit["scales"]) + scale
    t = np.eye(2) * fit["scales"][scale] ** 2
    for g in range(5):
        post_cov = np.linalg.inv(np.linalg.inv(t) + np.linalg.inv(cov[g]))
        post_mean = post_cov @ np.linalg.solve(cov[g], x[g])
        np.testing.assert_allclose(fit["component_means"][g, k], post_mean, rtol=1e-8)
        np.testing.assert_allclose(fit["component_sds"][g, k], np.sqrt(np.diag(post_cov)))
    # The point mass leaves nothing to learn: mean 0, sd 0.
    assert np.all(fit["component_means"][:, 0] == 0) and np.all(fit["component_sds"][:, 0] == 0)


def test_learned_pattern_is_the_direction_of_the_changes():
    truth, x, cov = _planted(np.random.default_rng(2))
    learned = covariance_patterns(x, cov)[-1]
    # Both parameters move together: the learned covariance is close to (1, 1)(1, 1)^T.
    assert learned[0, 1] / np.sqrt(learned[0, 0] * learned[1, 1]) > 0.9


def test_sharing_the_pattern_raises_recall_of_the_noisy_parameter_at_the_same_error():
    rng = np.random.default_rng(3)
    truth, x, cov = _planted(rng)
    delta = 0.5
    fit = shrink_lfc_joint(x, cov)
    w = fit["posterior_weights"]
    joint_calls, separate_calls = [], []
    for i in range(2):
        up, down = normal_mixture_tails(
            w, fit["component_means"][..., i], fit["component_sds"][..., i], delta
        )
        joint_calls.append(fdr_calls(np.minimum(up + down, 1), 0.05))
        se = np.sqrt(cov[:, i, i])
        _, ash = shrink_lfc(x[:, i], se)
        up, down = normal_mixture_tails(
            ash["posterior_weights"], ash["component_means"], ash["component_sds"], delta
        )
        separate_calls.append(fdr_calls(np.minimum(up + down, 1), 0.05))
    true = np.abs(truth) >= 1.0
    for calls in (joint_calls, separate_calls):
        for i in range(2):
            # Realised error: calls where the truth is inside the equivalence region.
            assert np.mean(np.abs(truth[calls[i], i]) < delta) <= 0.08
    recall_joint = np.mean(joint_calls[1][true[:, 1]])
    recall_separate = np.mean(separate_calls[1][true[:, 1]])
    assert recall_joint > recall_separate + 0.2
    # Posterior means are closer to the truth than the raw estimates.
    post_mean = np.einsum("gk,gkp->gp", w, fit["component_means"])
    assert np.mean((post_mean - truth) ** 2) < 0.7 * np.mean((x - truth) ** 2)


def test_joint_shrinkage_errors():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="lfc_cov"):
        shrink_lfc_joint(x, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="positive definite"):
        shrink_lfc_joint(x, np.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match="finite"):
        shrink_lfc_joint(x + np.nan, np.broadcast_to(np.eye(2), (4, 2, 2)))


def test_stratified_covariance_matches_monte_carlo():
    rng = np.random.default_rng(4)
    n_genes, n_rep = 50, 4000
    # Two batches; per set and batch, (p, q) estimates with known covariance.
    spec = {}
    for s in ("a", "b"):
        for j in range(2):
            sd = rng.uniform(0.2, 1.0, (2, n_genes))
            rho = rng.uniform(-0.8, 0.8, n_genes)
            spec[f"{s}@{j}"] = (sd, rho)
    lfc = {"p": [], "q": []}
    estimates, cross = {}, {}
    for k, (sd, rho) in spec.items():
        estimates[k] = {"p": (None, sd[0] ** 2), "q": (None, sd[1] ** 2)}
        cross[k] = {("p", "q"): rho * sd[0] * sd[1]}
    for _ in range(n_rep):
        draw = {}
        for k, (sd, rho) in spec.items():
            z1, z2 = rng.standard_normal((2, n_genes))
            vp = sd[0] * z1
            vq = sd[1] * (rho * z1 + np.sqrt(1 - rho**2) * z2)
            draw[k] = {"p": (vp, sd[0] ** 2), "q": (vq, sd[1] ** 2)}

        def compare(a, b):
            return a[0] - b[0], np.sqrt(a[1] + b[1])

        for name in ("p", "q"):
            lfc[name].append(stratified_compare(draw, "a", "b", name, 2, compare, 10.0)[0])
    p, q = np.array(lfc["p"]), np.array(lfc["q"])
    empirical = ((p - p.mean(0)) * (q - q.mean(0))).mean(0)
    predicted = stratified_cross(estimates, cross, "a", "b", ("p", "q"), 2, 10.0)
    scale = p.std(0) * q.std(0)
    np.testing.assert_allclose(empirical / scale, predicted / scale, atol=0.06)
