"""The two-species bursty scheme: geometric bursts, splicing, degradation.

Reactions (rates in units of the burst frequency ``k = 1``)::

    0 -> B x N   at rate 1,  B ~ Geometric on {0, 1, ...} with mean b
    N -> M       at rate beta
    M -> 0       at rate gamma

The nascent marginal is exactly ``NB(shape 1/beta, mean b/beta)``; the mature count
given the nascent one has no closed form. :class:`BurstyScheme` therefore computes
``log P(n, m) = log NB(n) + log P(m | n)`` with a pluggable *backend* for the
conditional (the shipped neural approximator, the exact solver, or any object with a
``log_prob_mature_given_nascent(nascent, mature, b, beta, gamma)`` method).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from pybivi.schemes.base import ReactionScheme, broadcast_params, nb_log_prob


@runtime_checkable
class ConditionalApproximator(Protocol):
    """What a bursty backend must provide: ``log P(m | n)`` as a torch function."""

    def log_prob_mature_given_nascent(
        self, nascent: Tensor, mature: Tensor, b: Tensor, beta: Tensor, gamma: Tensor
    ) -> Tensor: ...


class ExactConditional:
    """``log P(m | n)`` of the bursty scheme from the exact generating-function solver.

    For every distinct ``(b, beta, gamma)`` in the batch the exact joint PMF is computed
    once (:func:`pybivi.cme.exact_pmf`) on the rows ``n <= max observed n`` and the
    columns up to the larger of the observed counts and the solver's natural mature
    grid (:func:`pybivi.cme.suggest_grid`, mass beyond it below ``1e-12``); each row is
    normalised to give the conditional and the observed ``(n, m)`` are looked up. This
    is slow (one solver call per distinct parameter set) and meant as a reference and
    for small problems.

    The returned values are **detached**: no gradient flows to ``b``, ``beta`` or
    ``gamma`` through the conditional (the nascent NB term of
    :meth:`BurstyScheme.log_prob` stays differentiable). The solver is accurate to about
    ``1e-12`` in absolute terms, so conditionals of rows with ``P(n)`` below about
    ``1e-9`` and entries with ``P(n, m)`` below about ``1e-12`` are not resolved (they
    may come out as ``-inf``).

    Parameters
    ----------
    max_grid
        Largest number of grid points ``(n_max + 1) * (m_max + 1)`` allowed for one
        parameter set; a larger need raises :class:`ValueError` instead of silently
        exhausting memory.
    """

    def __init__(self, max_grid: int = 4_000_000) -> None:
        self.max_grid = int(max_grid)

    def _grid(self, b: float, beta: float, gamma: float, n_obs: int, m_obs: int) -> tuple[int, int]:
        from pybivi.cme import suggest_grid

        # The natural mature grid also holds the conditional mass of every row that
        # the solver resolves (checked against much wider grids), so no extra margin.
        m_max = max(m_obs, suggest_grid("bursty", b=b, beta=beta, gamma=gamma)[1])
        n_max = n_obs
        if (n_max + 1) * (m_max + 1) > self.max_grid:
            raise ValueError(
                f"exact bursty backend: the grid for b={b:.4g}, beta={beta:.4g}, "
                f"gamma={gamma:.4g} would be {n_max + 1} x {m_max + 1} points, more than "
                f"max_grid={self.max_grid}; use the neural backend for such parameters"
            )
        return n_max, m_max

    def log_prob_mature_given_nascent(
        self, nascent: Tensor, mature: Tensor, b: Tensor, beta: Tensor, gamma: Tensor
    ) -> Tensor:
        """Exact ``log P(m | n)``; shape of the broadcast inputs, detached."""
        from pybivi.cme import exact_pmf  # loaded on first use: schemes import cheaply

        nascent, mature, b, beta, gamma = torch.broadcast_tensors(nascent, mature, b, beta, gamma)
        shape, dtype, device = b.shape, b.dtype, b.device
        n = nascent.detach().reshape(-1).cpu().numpy().astype(np.int64)
        m = mature.detach().reshape(-1).cpu().numpy().astype(np.int64)
        params = torch.stack([b, beta, gamma], -1).detach().reshape(-1, 3).cpu().double().numpy()
        out = np.empty(n.shape[0], dtype=np.float64)
        if n.shape[0] == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        unique, inverse = np.unique(params, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
        for k, (bk, betak, gammak) in enumerate(unique):
            idx = order[bounds[k] : bounds[k + 1]]
            n_max, m_max = self._grid(bk, betak, gammak, int(n[idx].max()), int(m[idx].max()))
            pmf = exact_pmf("bursty", n_max=n_max, m_max=m_max, b=bk, beta=betak, gamma=gammak)
            # Round-off of the solver can leave tiny negative values far in the tail:
            # there the probability is below what float64 resolves, so log gives -inf.
            with np.errstate(divide="ignore", invalid="ignore"):
                log_pmf = np.log(np.clip(pmf, 0.0, None))
                log_row = np.log(np.clip(pmf, 0.0, None).sum(axis=1, keepdims=True))
            out[idx] = (log_pmf - log_row)[n[idx], m[idx]]
        return torch.as_tensor(out, dtype=dtype, device=device).reshape(shape)

    def __repr__(self) -> str:
        return f"ExactConditional(max_grid={self.max_grid})"


_MAX_POINTS = 5e7


def _survival_parts(age: Tensor, beta: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """``(p_N(a), p_M(a))``: a molecule born ``a`` ago is nascent / mature now.

    ``p_N = exp(-beta a)`` and ``p_M = beta (exp(-gamma a) - exp(-beta a)) / (beta - gamma)``,
    the latter written as ``beta exp(-min a) (-expm1(-|beta - gamma| a)) / |beta - gamma|``
    so that it stays accurate for ``beta ~ gamma`` (limit ``beta a exp(-beta a)``).
    """
    diff = (beta - gamma).abs()
    safe = torch.where(diff > 0, diff, torch.ones_like(diff))
    phi = torch.where(diff > 0, -torch.expm1(-diff * age) / safe, age)
    phi = phi * torch.exp(-torch.minimum(beta, gamma) * age)
    return torch.exp(-beta * age), beta * phi


def sample_bursty(
    b: Tensor, beta: Tensor, gamma: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Exact steady-state draws of the bursty scheme, one per element of ``b``.

    Construction: looking back in time, bursts arrived at rate 1 with geometric sizes
    (mean ``b``). A molecule of a burst of age ``a`` is alive with probability
    ``s(a) = p_N(a) + p_M(a)``, so the surviving part of a burst is geometric with mean
    ``b s(a)`` and the bursts that left at least one survivor form a Poisson process of
    intensity ``q(a) = b s(a) / (1 + b s(a))``. A Chernoff bound gives
    ``s(a) <= C exp(-lam a)`` for any ``0 < lam < min(beta, gamma)`` with
    ``C = beta gamma / ((beta - lam)(gamma - lam))`` (``C <= 4`` at half the minimum;
    :func:`_envelope` picks ``lam`` per element), hence
    ``q(a) <= h(a) = min(1, C b exp(-lam a))``. The process of intensity ``h`` is drawn
    by inverting its cumulative intensity in closed form and thinned with probability
    ``q / h``; each accepted burst contributes ``S = 1 + Geometric(mean b s(a))``
    survivors of which ``Binomial(S, p_N / s)`` are nascent. Expected work per draw is
    about ``(log(C b) + 1) / lam`` candidate bursts.

    Parameters
    ----------
    b, beta, gamma
        Positive tensors that broadcast together (burst size, splicing and degradation
        rates in units of the burst frequency).
    generator
        Optional torch random generator for reproducible draws.

    Returns
    -------
    Tensor
        Counts of shape ``b.shape + (2,)`` (nascent, mature), float64.
    """
    b, beta, gamma = torch.broadcast_tensors(*(torch.as_tensor(x) for x in (b, beta, gamma)))
    shape = b.shape
    b, beta, gamma = (x.detach().reshape(-1).double().cpu() for x in (b, beta, gamma))
    lam, scale, a0, head, total = _envelope(b, beta, gamma)
    if b.shape[0] and float(total.max()) > _MAX_POINTS:
        k = int(torch.argmax(total))
        raise ValueError(
            f"bursty sampler: b={float(b[k]):.4g}, beta={float(beta[k]):.4g}, "
            f"gamma={float(gamma[k]):.4g} needs about {float(total[k]):.3g} candidate bursts "
            f"per draw (rates far below the burst frequency); more than {_MAX_POINTS:.0e}"
        )
    counts = torch.zeros(b.shape[0], 2, dtype=torch.float64)
    # Chunk so that the candidate points of one pass stay within a few million.
    budget = 4_000_000
    start = 0
    cum = torch.cumsum(total, 0)
    while start < b.shape[0]:
        offset = cum[start - 1] if start > 0 else 0.0
        stop = int(torch.searchsorted(cum, offset + budget, right=True))
        stop = min(max(stop, start + 1), b.shape[0])
        sl = slice(start, stop)
        counts[sl] = _sample_chunk(
            b[sl], beta[sl], gamma[sl], lam[sl], scale[sl], a0[sl], head[sl], total[sl], generator
        )
        start = stop
    return counts.reshape(*shape, 2)


def _envelope(b: Tensor, beta: Tensor, gamma: Tensor) -> tuple[Tensor, ...]:
    """The dominating intensity ``h(a) = min(1, C b exp(-lam a))`` with the fewest points.

    Any ``lam < min(beta, gamma)`` gives a valid bound with
    ``C = beta gamma / ((beta - lam)(gamma - lam))``; a larger ``lam`` decays faster but
    raises ``C``. Per element, keep the fraction of ``min(beta, gamma)`` whose expected
    number of candidates ``log(C b) / lam + min(1, C b) / lam`` is smallest.
    """
    best = None
    for fraction in (0.5, 0.75, 0.9, 0.97):
        lam = fraction * torch.minimum(beta, gamma)
        scale = b * beta * gamma / ((beta - lam) * (gamma - lam))  # C b
        # h(a) = 1 up to a0 = log(C b) / lam, then C b exp(-lam a).
        a0 = torch.clamp(torch.log(scale), min=0.0) / lam
        head = torch.clamp(scale, max=1.0)  # h at a0
        total = a0 + head / lam  # the integral of h over [0, inf)
        if best is None:
            best = [lam, scale, a0, head, total]
            continue
        better = total < best[4]
        best = [
            torch.where(better, new, old)
            for new, old in zip((lam, scale, a0, head, total), best, strict=True)
        ]
    return tuple(best)


def _sample_chunk(
    b: Tensor,
    beta: Tensor,
    gamma: Tensor,
    lam: Tensor,
    scale: Tensor,
    a0: Tensor,
    head: Tensor,
    total: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    n_points = torch.poisson(total, generator=generator).long()
    owner = torch.repeat_interleave(torch.arange(b.shape[0]), n_points)
    u = torch.rand(owner.shape[0], dtype=torch.float64, generator=generator) * total[owner]
    a0_o, lam_o, scale_o = a0[owner], lam[owner], scale[owner]
    # Invert H(a) = a on [0, a0] and H(a) = a0 + (head - C b exp(-lam a)) / lam beyond.
    beyond = (head[owner] - lam_o * (u - a0_o)).clamp(min=1e-300)
    age = torch.where(u <= a0_o, u, -torch.log(beyond / scale_o) / lam_o)
    b_o, beta_o, gamma_o = b[owner], beta[owner], gamma[owner]
    p_n, p_m = _survival_parts(age, beta_o, gamma_o)
    alive = p_n + p_m
    mean_alive = b_o * alive
    q = mean_alive / (1.0 + mean_alive)
    h = torch.clamp(scale_o * torch.exp(-lam_o * age), max=1.0)
    accept = torch.rand(age.shape[0], dtype=torch.float64, generator=generator) * h < q
    mean_alive, p_n, alive, owner = mean_alive[accept], p_n[accept], alive[accept], owner[accept]
    # 1 + Geometric(mean m) on {0, 1, ...}: floor(log U / log(m / (1 + m))).
    uniform = 1.0 - torch.rand(mean_alive.shape[0], dtype=torch.float64, generator=generator)
    survivors = 1.0 + torch.floor(-torch.log(uniform) / torch.log1p(1.0 / mean_alive))
    nascent = torch.binomial(survivors, (p_n / alive).clamp(0.0, 1.0), generator=generator)
    counts = torch.zeros(b.shape[0], 2, dtype=torch.float64)
    return counts.index_add_(0, owner, torch.stack([nascent, survivors - nascent], dim=-1))


def _resolve_backend(backend: Any) -> Any:
    if isinstance(backend, str):
        if backend == "exact":
            return ExactConditional()
        if backend == "neural":
            from pybivi import cme

            if not hasattr(cme, "load_default_approximator"):
                raise ValueError(
                    "bursty backend 'neural' needs pybivi.cme.load_default_approximator(), "
                    "which this installation does not provide; use backend='exact'"
                )
            return cme.load_default_approximator()
        raise ValueError(f"unknown bursty backend {backend!r}: use 'neural', 'exact' or an object")
    if not isinstance(backend, ConditionalApproximator):
        raise ValueError(
            "a bursty backend object must have a method "
            "log_prob_mature_given_nascent(nascent, mature, b, beta, gamma); "
            f"got {type(backend).__name__}"
        )
    return backend


class BurstyScheme(ReactionScheme):
    """Bursty transcription with splicing: the likelihood of ContrastiveBiVI.

    Kinetic parameters from the decoder's quantities (ContrastiveBiVI paper, equation 3)::

        b = mu_nascent / theta,  beta = 1 / theta,  gamma = mu_nascent / (theta * mu_mature)

    Parameters
    ----------
    backend
        How ``log P(m | n)`` is computed: ``"neural"`` (default; the shipped
        approximator, loaded at first use), ``"exact"`` (:class:`ExactConditional`,
        slow, detached) or an object with
        ``log_prob_mature_given_nascent(nascent, mature, b, beta, gamma)``.
    """

    name = "bursty"
    kinetic_param_names = ("burst_size", "splicing_rate", "degradation_rate")
    exact_param_names = ("b", "beta", "gamma")
    uses_theta = True

    def __init__(self, backend: Any = "neural") -> None:
        if isinstance(backend, str) and backend not in ("neural", "exact"):
            raise ValueError(f"unknown bursty backend {backend!r}: use 'neural' or 'exact'")
        if not isinstance(backend, str):
            _resolve_backend(backend)  # validate the object now, not at first use
        self._backend_spec = backend
        self._backend: Any = None

    @property
    def backend(self) -> Any:
        """The resolved conditional approximator (loaded lazily at first access)."""
        if self._backend is None:
            self._backend = _resolve_backend(self._backend_spec)
        return self._backend

    def kinetic_params(
        self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor
    ) -> dict[str, Tensor]:
        """``burst_size`` b, ``splicing_rate`` beta/k and ``degradation_rate`` gamma/k."""
        mu_nascent, mu_mature, theta = broadcast_params(mu_nascent, mu_mature, theta)
        b = mu_nascent / theta
        return {
            "burst_size": b,
            "splicing_rate": 1.0 / theta,
            "degradation_rate": b / mu_mature,
        }

    def from_kinetic_params(
        self, b: Tensor | float, beta: Tensor | float, gamma: Tensor | float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Inverse map: ``(mu_nascent, mu_mature, theta) = (b/beta, b/gamma, 1/beta)``."""
        b, beta, gamma = broadcast_params(b, beta, gamma)
        return b / beta, b / gamma, 1.0 / beta

    def log_prob(
        self, nascent: Tensor, mature: Tensor, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor
    ) -> Tensor:
        """``log NB(n; mean mu_nascent, shape theta) + log P(m | n)`` from the backend."""
        kin = self.kinetic_params(mu_nascent, mu_mature, theta)
        log_nascent = nb_log_prob(nascent, mu_nascent, theta)
        log_cond = self.backend.log_prob_mature_given_nascent(
            nascent, mature, kin["burst_size"], kin["splicing_rate"], kin["degradation_rate"]
        )
        return log_nascent + log_cond

    def variance(self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor) -> Tensor:
        """``Var N = mu_N (1 + b)``, ``Var M = mu_M (1 + b beta / (beta + gamma))``."""
        mu_nascent, mu_mature, theta = broadcast_params(mu_nascent, mu_mature, theta)
        kin = self.kinetic_params(mu_nascent, mu_mature, theta)
        b, beta, gamma = kin["burst_size"], kin["splicing_rate"], kin["degradation_rate"]
        var_n = mu_nascent * (1.0 + b)
        var_m = mu_mature * (1.0 + b * beta / (beta + gamma))
        return torch.stack([var_n, var_m], dim=-1)

    def covariance(self, mu_nascent: Tensor, mu_mature: Tensor, theta: Tensor) -> Tensor:
        """``Cov(N, M) = b**2 / (beta + gamma)``."""
        kin = self.kinetic_params(mu_nascent, mu_mature, theta)
        b, beta, gamma = kin["burst_size"], kin["splicing_rate"], kin["degradation_rate"]
        return b * b / (beta + gamma)

    def sample(
        self,
        mu_nascent: Tensor,
        mu_mature: Tensor,
        theta: Tensor,
        sample_shape: torch.Size | tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Exact steady-state draws of ``(nascent, mature)`` (see :func:`sample_bursty`)."""
        kin = self.kinetic_params(mu_nascent, mu_mature, theta)
        b, beta, gamma = kin["burst_size"], kin["splicing_rate"], kin["degradation_rate"]
        shape = torch.Size(sample_shape) + b.shape
        draws = sample_bursty(
            b.detach().expand(shape),
            beta.detach().expand(shape),
            gamma.detach().expand(shape),
            generator=generator,
        )
        # The thinning sampler runs on the CPU: hand the draws back where the inputs live.
        return draws.to(device=b.device, dtype=b.dtype)

    def __repr__(self) -> str:
        spec = self._backend_spec
        shown = spec if isinstance(spec, str) else type(spec).__name__
        return f"BurstyScheme(backend={shown!r})"
