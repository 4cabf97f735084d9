"""The extrinsic-noise scheme: constitutive transcription with a gamma-distributed rate.

Each cell-gene draws a transcription rate ``lam ~ Gamma(shape alpha, mean 1)`` (in
units of ``k``); given it, N and M are independent Poissons with means
``lam / beta`` and ``lam / gamma``. Integrating ``lam`` out gives a bivariate negative
binomial with the closed form::

    log P(n, m) = a log a - (a + n + m) log(a + m1 + m2) + n log m1 + m log m2
                  + lgamma(n + m + a) - lgamma(a) - lgamma(n + 1) - lgamma(m + 1)

with ``a = alpha = theta``, ``m1 = mu_nascent = alpha / beta``, ``m2 = mu_mature = alpha / gamma``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pybivi.schemes.base import ReactionScheme, broadcast_params


def _standard_gamma(alpha: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gamma(alpha, 1) draws; reproducible from ``generator`` when one is given.

    ``torch._standard_gamma`` takes no generator, so with one we seed a forked global
    stream from it: the draws are then a deterministic function of the generator and
    the caller's global random state is left untouched.
    """
    if generator is None:
        return torch._standard_gamma(alpha)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch._standard_gamma(alpha)


class ExtrinsicScheme(ReactionScheme):
    """Bivariate negative binomial: a shared gamma-distributed transcription rate.

    Kinetic parameters: ``alpha = theta``, ``splicing_rate = theta / mu_nascent``,
    ``degradation_rate = theta / mu_mature`` (see the reaction-schemes table of the
    documentation, concepts page).
    """

    name = "extrinsic"
    kinetic_param_names = ("alpha", "splicing_rate", "degradation_rate")
    exact_param_names = ("alpha", "beta", "gamma")
    uses_theta = True

    def kinetic_params(
        self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor
    ) -> dict[str, Tensor]:
        """``alpha`` (gamma shape), ``splicing_rate`` beta/k and ``degradation_rate`` gamma/k."""
        mu_nascent, mu_mature, theta = broadcast_params(mu_nascent, mu_mature, theta)
        return {
            "alpha": theta,
            "splicing_rate": theta / mu_nascent,
            "degradation_rate": theta / mu_mature,
        }

    def from_kinetic_params(
        self, alpha: Tensor | float, beta: Tensor | float, gamma: Tensor | float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Inverse map: ``(mu_nascent, mu_mature, theta) = (alpha/beta, alpha/gamma, alpha)``."""
        alpha, beta, gamma = broadcast_params(alpha, beta, gamma)
        return alpha / beta, alpha / gamma, alpha

    def log_prob(
        self, nascent: Tensor, mature: Tensor, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor
    ) -> Tensor:
        """The closed-form bivariate negative binomial log-pmf."""
        n, m, a = nascent, mature, theta
        return (
            a * torch.log(a)
            - (a + n + m) * torch.log(a + mu_nascent + mu_mature)
            + n * torch.log(mu_nascent)
            + m * torch.log(mu_mature)
            + torch.lgamma(n + m + a)
            - torch.lgamma(a)
            - torch.lgamma(n + 1.0)
            - torch.lgamma(m + 1.0)
        )

    def variance(self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor) -> Tensor:
        """``Var = mu + mu**2 / alpha`` for each species."""
        mu = self.mean(mu_nascent, mu_mature, theta)
        return mu + mu * mu / torch.as_tensor(theta, dtype=mu.dtype).unsqueeze(-1)

    def covariance(self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor) -> Tensor:
        """``Cov(N, M) = mu_N mu_M / alpha``."""
        mu_nascent, mu_mature, theta = broadcast_params(mu_nascent, mu_mature, theta)
        return mu_nascent * mu_mature / theta

    def sample(
        self,
        mu_nascent: Tensor,
        mu_mature: Tensor,
        theta: Tensor,
        sample_shape: torch.Size | tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Exact draws: ``lam ~ Gamma(alpha, 1)``, then Poissons of means ``lam mu / alpha``."""
        mu_nascent, mu_mature, theta = broadcast_params(mu_nascent, mu_mature, theta)
        shape = torch.Size(sample_shape) + mu_nascent.shape
        alpha = theta.detach().expand(shape).contiguous()
        lam = _standard_gamma(alpha, generator) / alpha
        rates = torch.stack(
            [mu_nascent.detach().expand(shape), mu_mature.detach().expand(shape)], -1
        )
        return torch.poisson(rates * lam.unsqueeze(-1), generator=generator)
