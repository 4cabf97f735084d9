"""check_scheme: the built-in schemes pass every check; each kind of broken scheme fails the
check that is meant to catch it, with a message naming it."""

from __future__ import annotations

import pytest
import torch

from pybivi import schemes
from pybivi.schemes.constitutive import ConstitutiveScheme
from pybivi.schemes.testing import SchemeCheckError, check_scheme

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["constitutive", "extrinsic", "bursty"])
def test_the_built_in_schemes_pass(name):
    report = check_scheme(schemes.get(name))
    assert report.name == name and len(report.params) == 3
    m = report.measures
    assert m["normalisation"] <= 1e-3 and m["moments_grid"] <= 0.02
    assert m["moments_samples"] <= 5.0 and m["gradients"] <= 1e-2
    assert name in str(report)


class _WrongNames(ConstitutiveScheme):
    name = "broken_names"

    def kinetic_params(self, mu_nascent, mu_mature, theta):
        out = super().kinetic_params(mu_nascent, mu_mature, theta)
        return {"beta": out["splicing_rate"], "degradation_rate": out["degradation_rate"]}


class _NoBroadcast(ConstitutiveScheme):
    name = "broken_shapes"

    def covariance(self, mu_nascent, mu_mature, theta):
        return torch.zeros_like(torch.as_tensor(mu_nascent))  # ignores the other shapes


class _Unnormalised(ConstitutiveScheme):
    name = "broken_normalisation"

    def log_prob(self, nascent, mature, mu_nascent, mu_mature, theta):
        # A forgotten lgamma(m + 1): no longer a probability law.
        return super().log_prob(nascent, mature, mu_nascent, mu_mature, theta) + torch.lgamma(
            mature + 1.0
        ) / 10


class _WrongVariance(ConstitutiveScheme):
    name = "broken_variance"

    def variance(self, mu_nascent, mu_mature, theta):
        return 1.3 * super().variance(mu_nascent, mu_mature, theta)


class _BiasedSampler(ConstitutiveScheme):
    name = "broken_sampler"

    def sample(self, mu_nascent, mu_mature, theta, sample_shape=(), generator=None):
        return super().sample(mu_nascent, 1.05 * mu_mature, theta, sample_shape, generator)


class _DetachedGradient(ConstitutiveScheme):
    name = "broken_gradient"

    def log_prob(self, nascent, mature, mu_nascent, mu_mature, theta):
        return super().log_prob(nascent, mature, mu_nascent, mu_mature.detach(), theta)


@pytest.mark.parametrize(
    ("broken", "check", "detail"),
    [
        (_WrongNames, "protocol", "kinetic_params returned"),
        (_NoBroadcast, "shapes", "covariance has shape"),
        (_Unnormalised, "normalisation", "sum to"),
        (_WrongVariance, "moments", "variance (nascent|mature) of the probabilities is"),
        (_BiasedSampler, "moments", "mean mature of 20000 draws"),
        (_DetachedGradient, "gradients", "d log_prob / d mu_mature"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_a_broken_scheme_fails_the_check_that_catches_it(broken, check, detail):
    with pytest.raises(SchemeCheckError, match=f"{check} check failed.*{detail}") as info:
        check_scheme(broken())
    assert isinstance(info.value, AssertionError) and info.value.check == check


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="ReactionScheme"):
        check_scheme("bursty")
    with pytest.raises(ValueError, match="params"):
        check_scheme(schemes.get("constitutive"), params=[(1.0, -2.0, 1.0)])
    with pytest.raises(ValueError, match="n_samples"):
        check_scheme(schemes.get("constitutive"), n_samples=10)
