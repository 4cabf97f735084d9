"""The reaction-scheme protocol: one small object per chemical reaction network.

A scheme turns the decoder's per cell-and-gene means ``(mu_nascent, mu_mature)`` and
the per-gene shape ``theta`` into kinetic parameters (rates in units of the burst
frequency ``k``) and gives the log-probability of observed count pairs ``(n, m)``.
Adding a scheme never touches the model code: subclass :class:`ReactionScheme`,
implement the abstract methods, and :func:`pybivi.schemes.register` it.

Conventions shared by every scheme
----------------------------------
* Species order is ``0 = nascent (unspliced)``, ``1 = mature (spliced)``.
* All tensor arguments broadcast against each other; results have the broadcast
  shape (``mean``/``variance``/``sample`` append a trailing axis of size 2).
* Work is done in log space; inputs are trusted here (validation happens at the
  boundary, in :class:`pybivi.distributions.BivariateCME` and the model classes).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor


class ReactionScheme(abc.ABC):
    """Base class of a two-species (nascent, mature) reaction scheme.

    Attributes
    ----------
    name
        Registry name, e.g. ``"bursty"``.
    kinetic_param_names
        Names of the per cell-and-gene kinetic parameters returned by
        :meth:`kinetic_params`, in a stable order (used for posterior export).
    exact_param_names
        The short names of the same parameters, in the same order, as taken by
        :func:`pybivi.cme.exact_pmf` (e.g. ``("b", "beta", "gamma")``).
    uses_theta
        Whether the per-gene shape ``theta`` enters the law (``False`` for the
        constitutive scheme, whose ``theta`` is ignored).
    """

    name: str = "abstract"
    kinetic_param_names: tuple[str, ...] = ()
    exact_param_names: tuple[str, ...] = ()
    uses_theta: bool = True

    @abc.abstractmethod
    def kinetic_params(
        self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor
    ) -> dict[str, Tensor]:
        """Map ``(mu_nascent, mu_mature, theta)`` to the kinetic parameters (docs: concepts)."""

    @abc.abstractmethod
    def log_prob(
        self, nascent: Tensor, mature: Tensor, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor
    ) -> Tensor:
        """Log-probability of the count pairs ``(nascent, mature)``."""

    @abc.abstractmethod
    def sample(
        self,
        mu_nascent: Tensor,
        mu_mature: Tensor,
        theta: Tensor,
        sample_shape: torch.Size | tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Exact draws of ``(nascent, mature)``; shape ``sample_shape + batch_shape + (2,)``."""

    def mean(self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor) -> Tensor:
        """Means of (nascent, mature): by construction ``(mu_nascent, mu_mature)``."""
        mu_nascent, mu_mature, _ = torch.broadcast_tensors(mu_nascent, mu_mature, theta)
        return torch.stack([mu_nascent, mu_mature], dim=-1)

    @abc.abstractmethod
    def variance(self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor) -> Tensor:
        """Variances of (nascent, mature), trailing axis of size 2."""

    @abc.abstractmethod
    def covariance(self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor) -> Tensor:
        """Covariance of nascent and mature counts."""

    def exact_pmf(
        self, n_max: int | None = None, m_max: int | None = None, **kinetic: float
    ) -> np.ndarray:
        """Exact steady-state joint PMF on ``[0, n_max] x [0, m_max]`` (see ``cme.exact_pmf``)."""
        from pybivi.cme import exact_pmf

        return exact_pmf(self.name, n_max=n_max, m_max=m_max, **kinetic)

    def exact_pmf_from_means(
        self,
        mu_nascent: float,
        mu_mature: float,
        theta: float,
        n_max: int | None = None,
        m_max: int | None = None,
    ) -> np.ndarray:
        """Exact joint PMF for one scalar ``(mu_nascent, mu_mature, theta)``.

        Maps the means to kinetic parameters with :meth:`kinetic_params` and calls
        :meth:`exact_pmf` with the short names of :attr:`exact_param_names`.
        """
        if len(self.exact_param_names) != len(self.kinetic_param_names):
            raise NotImplementedError(
                f"scheme {self.name!r} declares no exact_param_names; it has no exact solver"
            )
        mu_n, mu_m, th = as_tensors(float(mu_nascent), float(mu_mature), float(theta))
        kinetic = self.kinetic_params(mu_n.double(), mu_m.double(), th.double())
        short = {
            short_name: float(kinetic[long_name])
            for short_name, long_name in zip(
                self.exact_param_names, self.kinetic_param_names, strict=True
            )
        }
        return self.exact_pmf(n_max=n_max, m_max=m_max, **short)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def nb_log_prob(value: Tensor, mu: Tensor, theta: Tensor) -> Tensor:
    """Log-pmf of a negative binomial with mean ``mu`` and shape (inverse dispersion) ``theta``.

    ``Var = mu + mu**2 / theta``. Written with ``log1p`` so that large ``theta`` (the
    Poisson limit) does not lose the ``theta * log(theta / (theta + mu))`` term.
    """
    log_theta_mu = torch.log(theta + mu)
    return (
        torch.lgamma(value + theta)
        - torch.lgamma(theta)
        - torch.lgamma(value + 1.0)
        - theta * torch.log1p(mu / theta)
        + value * (torch.log(mu) - log_theta_mu)
    )


def poisson_log_prob(value: Tensor, rate: Tensor) -> Tensor:
    """Log-pmf of a Poisson law with mean ``rate`` (``rate > 0``)."""
    return value * torch.log(rate) - rate - torch.lgamma(value + 1.0)


def broadcast_params(*values: Tensor | float) -> list[Tensor]:
    """Convert to tensors of a common floating dtype and broadcast them."""
    return list(torch.broadcast_tensors(*as_tensors(*values)))


def as_tensors(*values: Tensor | float, like: Tensor | None = None) -> list[Tensor]:
    """Convert numbers to tensors of a common floating dtype and device."""
    ref = like
    if ref is None:
        ref = next((v for v in values if isinstance(v, Tensor) and v.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    device = ref.device if ref is not None else None
    return [torch.as_tensor(v, dtype=dtype, device=device) for v in values]


SchemeLike = "str | ReactionScheme"
KineticDict = Mapping[str, Tensor]
