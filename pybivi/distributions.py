"""Pyro distributions over single-cell counts.

* :class:`BivariateCME`: the steady state of a two-species reaction scheme over
  ``(nascent, mature)`` count pairs, parameterised by the decoder's means and a
  per-gene shape, for the bivariate models (ContrastiveBiVI, biVI).
* :class:`NegativeBinomial` and :class:`ZeroInflatedNegativeBinomial`: mean/shape
  parameterised univariate laws for the mature-only baselines (scVI, contrastiveVI).

All log-probabilities are computed in log space without floors, and every
distribution checks its inputs when ``validate_args`` is on (Pyro's default), with
messages that name the offending argument.
"""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions import TorchDistribution
from pyro.distributions.zero_inflated import ZeroInflatedDistribution
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from pybivi import schemes
from pybivi.schemes.base import ReactionScheme, nb_log_prob

__all__ = ["BivariateCME", "NegativeBinomial", "ZeroInflatedNegativeBinomial"]


def _check_positive(name: str, value: Tensor, owner: str) -> None:
    if torch.isnan(value).any():
        raise ValueError(f"{owner}: parameter {name} contains NaN")
    if not bool((value > 0).all()) or torch.isinf(value).any():
        bad = value[~((value > 0) & torch.isfinite(value))].flatten()[:3].tolist()
        raise ValueError(f"{owner}: parameter {name} must be positive and finite; found {bad}")


def _check_counts(value: Tensor, owner: str) -> None:
    if torch.isnan(value).any():
        raise ValueError(f"{owner}: the observed counts contain NaN")
    if torch.isinf(value).any():
        raise ValueError(f"{owner}: the observed counts contain infinite values")
    if bool((value < 0).any()):
        bad = value[value < 0].flatten()[:3].tolist()
        raise ValueError(f"{owner}: counts must be non-negative; found {bad}")
    if value.is_floating_point() and bool((value != torch.floor(value)).any()):
        bad = value[value != torch.floor(value)].flatten()[:3].tolist()
        raise ValueError(f"{owner}: counts must be whole numbers; found {bad}")


def _expandable(old: torch.Size, new: Any, owner: str) -> torch.Size:
    """``new`` as a Size, after checking that a batch of shape ``old`` expands to it."""
    new = torch.Size(new)
    if len(new) < len(old) or any(
        o != 1 and o != n for o, n in zip(reversed(old), reversed(new), strict=False)
    ):
        raise ValueError(f"{owner}: cannot expand batch shape {tuple(old)} to {tuple(new)}")
    return new


def _as_float(*values: Any) -> list[Tensor]:
    """Tensors of one floating dtype (the default one unless a tensor says otherwise)."""
    ref = next((v for v in values if isinstance(v, Tensor) and v.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    return [torch.as_tensor(v, dtype=dtype) for v in values]


class BivariateCME(TorchDistribution):
    """Steady-state law of (nascent, mature) counts under a reaction scheme.

    Parameters
    ----------
    mu_nascent, mu_mature
        Positive means of the nascent and mature counts (``l^N rho_N``, ``l^M rho_M``).
    theta
        Positive per-gene shape (for the bursty scheme ``theta = k / beta``; the
        nascent marginal is ``NB(mean mu_nascent, shape theta)``).
    scheme
        A registered scheme name (``"bursty"``, ``"constitutive"``, ``"extrinsic"``) or
        a :class:`~pybivi.schemes.ReactionScheme` instance, e.g.
        ``pybivi.schemes.get("bursty", backend="exact")``.
    validate_args
        Check parameters and observed values (Pyro's global default when ``None``).

    Notes
    -----
    ``event_shape == (2,)`` with the last axis ``(nascent, mature)``; the batch shape
    is the broadcast of the three parameters. Sampling is exact (via the scheme) and
    not reparameterisable.
    """

    arg_constraints = {
        "mu_nascent": constraints.positive,
        "mu_mature": constraints.positive,
        "theta": constraints.positive,
    }
    support = constraints.independent(constraints.nonnegative_integer, 1)
    has_rsample = False

    def __init__(
        self,
        mu_nascent: Tensor | float,
        mu_mature: Tensor | float,
        theta: Tensor | float,
        scheme: str | ReactionScheme = "bursty",
        validate_args: bool | None = None,
    ) -> None:
        self.scheme = schemes.get(scheme)
        mu_nascent, mu_mature, theta = _as_float(mu_nascent, mu_mature, theta)
        try:
            self.mu_nascent, self.mu_mature, self.theta = broadcast_all(
                mu_nascent, mu_mature, theta
            )
        except RuntimeError as err:
            raise ValueError(
                "BivariateCME: mu_nascent, mu_mature and theta do not broadcast: "
                f"shapes {tuple(mu_nascent.shape)}, {tuple(mu_mature.shape)}, "
                f"{tuple(theta.shape)}"
            ) from err
        validate = validate_args if validate_args is not None else self._validate_args
        if validate:
            for name in ("mu_nascent", "mu_mature", "theta"):
                _check_positive(name, getattr(self, name), "BivariateCME")
        super().__init__(self.mu_nascent.shape, torch.Size([2]), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> BivariateCME:
        """Broadcast to ``batch_shape``; the scheme (and its backend) is kept."""
        new = self._get_checked_instance(BivariateCME, _instance)
        batch_shape = _expandable(self.batch_shape, batch_shape, "BivariateCME")
        new.scheme = self.scheme
        new.mu_nascent = self.mu_nascent.expand(batch_shape)
        new.mu_mature = self.mu_mature.expand(batch_shape)
        new.theta = self.theta.expand(batch_shape)
        super(BivariateCME, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _validate_sample(self, value: Tensor) -> None:
        if not isinstance(value, Tensor):
            raise ValueError("BivariateCME: the value must be a tensor of count pairs")
        if value.dim() == 0 or value.shape[-1] != 2:
            raise ValueError(
                "BivariateCME: the value's last axis must hold (nascent, mature), size 2; "
                f"got shape {tuple(value.shape)}"
            )
        _check_counts(value, "BivariateCME")
        super()._validate_sample(value)

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-probability of count pairs ``value[..., 0] = n``, ``value[..., 1] = m``."""
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self.mu_nascent.dtype)
        return self.scheme.log_prob(
            value[..., 0], value[..., 1], self.mu_nascent, self.mu_mature, self.theta
        )

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Exact draws of shape ``sample_shape + batch_shape + (2,)``."""
        with torch.no_grad():
            return self.scheme.sample(
                self.mu_nascent, self.mu_mature, self.theta, sample_shape=torch.Size(sample_shape)
            ).to(self.mu_nascent.dtype)

    @property
    def mean(self) -> Tensor:
        return self.scheme.mean(self.mu_nascent, self.mu_mature, self.theta)

    @property
    def variance(self) -> Tensor:
        return self.scheme.variance(self.mu_nascent, self.mu_mature, self.theta)

    @property
    def covariance(self) -> Tensor:
        """Covariance of the nascent and mature counts, shape ``batch_shape``."""
        return self.scheme.covariance(self.mu_nascent, self.mu_mature, self.theta)

    @property
    def kinetic_params(self) -> dict[str, Tensor]:
        """The scheme's kinetic parameters (rates in units of the burst frequency)."""
        return self.scheme.kinetic_params(self.mu_nascent, self.mu_mature, self.theta)

    def __repr__(self) -> str:
        return f"BivariateCME(scheme={self.scheme!r}, batch_shape={tuple(self.batch_shape)})"


class NegativeBinomial(TorchDistribution):
    """Negative binomial with mean ``mu`` and shape (inverse dispersion) ``theta``.

    ``Var = mu + mu**2 / theta``; ``theta -> inf`` is the Poisson limit. Sampling is
    the gamma-Poisson mixture (as Pyro's ``GammaPoisson``).

    Parameters
    ----------
    mu
        Positive mean.
    theta
        Positive shape.
    validate_args
        Check parameters and values (Pyro's global default when ``None``).
    """

    arg_constraints = {"mu": constraints.positive, "theta": constraints.positive}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(
        self, mu: Tensor | float, theta: Tensor | float, validate_args: bool | None = None
    ) -> None:
        mu, theta = _as_float(mu, theta)
        try:
            self.mu, self.theta = broadcast_all(mu, theta)
        except RuntimeError as err:
            raise ValueError(
                f"NegativeBinomial: mu {tuple(mu.shape)} and theta {tuple(theta.shape)} "
                "do not broadcast"
            ) from err
        validate = validate_args if validate_args is not None else self._validate_args
        if validate:
            _check_positive("mu", self.mu, "NegativeBinomial")
            _check_positive("theta", self.theta, "NegativeBinomial")
        super().__init__(self.mu.shape, torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> NegativeBinomial:
        new = self._get_checked_instance(NegativeBinomial, _instance)
        batch_shape = _expandable(self.batch_shape, batch_shape, "NegativeBinomial")
        new.mu = self.mu.expand(batch_shape)
        new.theta = self.theta.expand(batch_shape)
        super(NegativeBinomial, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _validate_sample(self, value: Tensor) -> None:
        _check_counts(torch.as_tensor(value), "NegativeBinomial")
        super()._validate_sample(value)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self.mu.dtype)
        return nb_log_prob(value, self.mu, self.theta)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            theta = self.theta.expand(shape)
            rate = torch._standard_gamma(theta.contiguous()) * (self.mu.expand(shape) / theta)
            return torch.poisson(rate)

    @property
    def mean(self) -> Tensor:
        return self.mu

    @property
    def variance(self) -> Tensor:
        return self.mu + self.mu * self.mu / self.theta


class ZeroInflatedNegativeBinomial(ZeroInflatedDistribution):
    """Zero-inflated :class:`NegativeBinomial` with mean ``mu``, shape ``theta``.

    With probability ``sigmoid(zi_logits)`` the count is an extra zero, otherwise it
    is ``NB(mu, theta)``; so the mean is ``(1 - sigmoid(zi_logits)) mu``.

    Parameters
    ----------
    mu
        Positive mean of the negative binomial component.
    theta
        Positive shape of the negative binomial component.
    zi_logits
        Real logits of the zero-inflation probability.
    validate_args
        Check parameters and values (Pyro's global default when ``None``).
    """

    arg_constraints = {
        "mu": constraints.positive,
        "theta": constraints.positive,
        "zi_logits": constraints.real,
    }
    support = constraints.nonnegative_integer

    def __init__(
        self,
        mu: Tensor | float,
        theta: Tensor | float,
        zi_logits: Tensor | float,
        validate_args: bool | None = None,
    ) -> None:
        mu, theta, zi_logits = _as_float(mu, theta, zi_logits)
        base = NegativeBinomial(mu, theta, validate_args=validate_args)
        validate = validate_args if validate_args is not None else self._validate_args
        if validate and torch.isnan(zi_logits).any():
            raise ValueError("ZeroInflatedNegativeBinomial: parameter zi_logits contains NaN")
        try:
            super().__init__(base, gate_logits=zi_logits, validate_args=validate_args)
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"ZeroInflatedNegativeBinomial: zi_logits {tuple(zi_logits.shape)} does not "
                f"broadcast with mu/theta {tuple(base.batch_shape)}"
            ) from err
        self._batch_shape = torch.Size(self._batch_shape)  # Pyro's base leaves a tuple

    @property
    def mu(self) -> Tensor:
        return self.base_dist.mu

    @property
    def theta(self) -> Tensor:
        return self.base_dist.theta

    @property
    def zi_logits(self) -> Tensor:
        return self.gate_logits

    def _validate_sample(self, value: Tensor) -> None:
        _check_counts(torch.as_tensor(value), "ZeroInflatedNegativeBinomial")
        super()._validate_sample(value)

    def expand(
        self, batch_shape: torch.Size, _instance: Any = None
    ) -> ZeroInflatedNegativeBinomial:
        new = self._get_checked_instance(ZeroInflatedNegativeBinomial, _instance)
        batch_shape = _expandable(self.batch_shape, batch_shape, "ZeroInflatedNegativeBinomial")
        ZeroInflatedDistribution.__init__(
            new,
            self.base_dist.expand(batch_shape),
            gate_logits=self.gate_logits.expand(batch_shape),
            validate_args=False,
        )
        new._validate_args = self._validate_args
        return new
