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
    uses_theta
        Whether the per-gene shape ``theta`` enters the law (``False`` for the
        constitutive scheme, whose ``theta`` is ignored).
    """

    name: str = "abstract"
    kinetic_param_names: tuple[str, ...] = ()
    uses_theta: bool = True

    @abc.abstractmethod
    def kinetic_params(self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor) -> dict[str, Tensor]:
        """Map ``(mu_nascent, mu_mature, theta)`` to the kinetic parameters (SPEC section 3)."""

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
        sample_shape: torch.Size | tuple[int, ...] = torch.Size(),
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
        """Exact steady-state joint PMF on ``[0, n_max] x [0, m_max]`` (see :func:`pybivi.cme.exact_pmf`)."""
        from pybivi.cme import exact_pmf

        return exact_pmf(self.name, n_max=n_max, m_max=m_max, **kinetic)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


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
