"""The constitutive scheme: single-molecule transcription, splicing, degradation.

Reactions (rates in units of the transcription rate ``k = 1``)::

    0 -> N  at rate 1,   N -> M  at rate beta,   M -> 0  at rate gamma

At steady state N and M are independent Poissons with means ``1/beta`` and
``1/gamma``. It is the small-burst limit of the bursty scheme (``b -> 0`` at fixed
means) and needs no shape parameter: ``theta`` is accepted and ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pybivi.schemes.base import ReactionScheme, broadcast_params, poisson_log_prob


class ConstitutiveScheme(ReactionScheme):
    """Independent Poisson nascent and mature counts (``theta`` unused).

    Kinetic parameters: ``splicing_rate = 1 / mu_nascent``,
    ``degradation_rate = 1 / mu_mature`` (see the reaction-schemes table of the documentation,
    concepts page).
    """

    name = "constitutive"
    kinetic_param_names = ("splicing_rate", "degradation_rate")
    exact_param_names = ("beta", "gamma")
    uses_theta = False

    def kinetic_params(
        self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor
    ) -> dict[str, Tensor]:
        """``splicing_rate`` beta/k = 1/mu_N and ``degradation_rate`` gamma/k = 1/mu_M."""
        mu_nascent, mu_mature, _ = broadcast_params(mu_nascent, mu_mature, theta)
        return {"splicing_rate": 1.0 / mu_nascent, "degradation_rate": 1.0 / mu_mature}

    def from_kinetic_params(
        self, beta: Tensor | float, gamma: Tensor | float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Inverse map: ``(mu_nascent, mu_mature, theta) = (1/beta, 1/gamma, 1)``.

        ``theta`` is unused by this scheme; ones are returned to keep the shapes.
        """
        beta, gamma = broadcast_params(beta, gamma)
        return 1.0 / beta, 1.0 / gamma, torch.ones_like(beta)

    def log_prob(
        self, nascent: Tensor, mature: Tensor, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor
    ) -> Tensor:
        """``log Poisson(n; mu_N) + log Poisson(m; mu_M)``, broadcast with ``theta``."""
        out = poisson_log_prob(nascent, mu_nascent) + poisson_log_prob(mature, mu_mature)
        # theta does not enter the law but still takes part in the batch shape.
        return out + torch.zeros_like(torch.as_tensor(theta, dtype=out.dtype))

    def variance(self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor) -> Tensor:
        """Poisson: the variances equal the means."""
        return self.mean(mu_nascent, mu_mature, theta)

    def covariance(self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor) -> Tensor:
        """Independent species: zero."""
        mu_nascent, _, _ = broadcast_params(mu_nascent, mu_mature, theta)
        return torch.zeros_like(mu_nascent)

    def sample(
        self,
        mu_nascent: Tensor,
        mu_mature: Tensor,
        theta: Tensor,
        sample_shape: torch.Size | tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Exact draws: two independent Poissons."""
        mu_nascent, mu_mature, _ = broadcast_params(mu_nascent, mu_mature, theta)
        shape = torch.Size(sample_shape) + mu_nascent.shape
        rates = torch.stack([mu_nascent.detach(), mu_mature.detach()], -1)
        return torch.poisson(rates.expand(*shape, 2).contiguous(), generator=generator)
