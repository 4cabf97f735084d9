"""Is a reaction scheme sound? :func:`check_scheme` runs the checks a new scheme must pass.

Run it on your own :class:`~pybivi.schemes.ReactionScheme` before fitting with it::

    from pybivi.schemes.testing import check_scheme

    report = check_scheme(MyScheme())
    print(report)

Each check evaluates the scheme at a few parameter sets ``(mu_nascent, mu_mature, theta)``:

``protocol``
    ``kinetic_param_names`` is a non-empty tuple of names and ``kinetic_params`` returns
    exactly those keys.
``shapes``
    Inputs of shapes ``(3, 1)``, ``(1, 4)`` and ``(4,)`` broadcast: every output has the
    broadcast shape (``mean``/``variance``/``sample`` with a trailing axis of 2,
    ``sample`` with ``sample_shape`` in front) and finite values.
``normalisation``
    ``exp(log_prob)`` summed over a grid holding all but a negligible tail of the mass (the
    grid reaches ``grid_sd`` standard deviations past the mean) is 1.
``moments``
    The grid's means, variances and covariance equal ``mean``, ``variance`` and
    ``covariance`` (relative tolerance ``moment_rtol``), and ``n_samples`` draws of
    ``sample`` agree with them (each within ``z_max`` Monte Carlo standard errors).
``gradients``
    The gradient of ``log_prob`` with respect to ``mu_nascent``, ``mu_mature`` and
    ``theta`` (autograd) is finite and agrees with central finite differences.

A failed check raises :class:`SchemeCheckError` (an :class:`AssertionError`) whose message
names the check and the parameters; success returns a :class:`SchemeReport` of the worst
deviation seen by each check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from pybivi.schemes.base import ReactionScheme

__all__ = ["check_scheme", "SchemeCheckError", "SchemeReport", "DEFAULT_PARAMS"]

#: ``(mu_nascent, mu_mature, theta)`` sets at which a scheme is checked by default.
DEFAULT_PARAMS: tuple[tuple[float, float, float], ...] = (
    (1.0, 2.0, 1.0),
    (4.0, 8.0, 3.0),
    (0.5, 5.0, 0.7),
)

_MAX_GRID = 2_000_000


class SchemeCheckError(AssertionError):
    """A reaction scheme failed one of the checks of :func:`check_scheme`."""

    def __init__(self, scheme: str, check: str, message: str) -> None:
        self.scheme, self.check = scheme, check
        super().__init__(f"check_scheme({scheme!r}): {check} check failed: {message}")


@dataclass
class SchemeReport:
    """What :func:`check_scheme` measured on a scheme that passed every check.

    Attributes
    ----------
    name
        The scheme's ``name``.
    params
        The ``(mu_nascent, mu_mature, theta)`` sets checked.
    measures
        Worst value per check: ``normalisation`` (``max |sum p - 1|``), ``moments_grid``
        (largest relative moment error on the grid), ``moments_samples`` (largest
        ``|z|`` of the Monte Carlo comparison), ``gradients`` (largest finite-difference
        disagreement, relative to ``1 + |gradient|``).
    """

    name: str
    params: tuple[tuple[float, float, float], ...]
    measures: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"reaction scheme {self.name!r}: all checks passed at {len(self.params)} "
                 "parameter sets"]
        lines += [f"  {k:16s} {v:.3g}" for k, v in self.measures.items()]
        return "\n".join(lines)


def _fail(name: str, check: str, message: str) -> SchemeCheckError:
    return SchemeCheckError(name, check, message)


def _describe(params: tuple[float, float, float]) -> str:
    return "mu_nascent={:g}, mu_mature={:g}, theta={:g}".format(*params)


def _scalars(params: tuple[float, float, float]) -> list[Tensor]:
    return [torch.tensor(float(v), dtype=torch.float64) for v in params]


def _check_protocol(scheme: ReactionScheme, name: str) -> None:
    names = scheme.kinetic_param_names
    if not isinstance(names, tuple) or not names or not all(isinstance(n, str) for n in names):
        raise _fail(name, "protocol", f"kinetic_param_names must be a non-empty tuple of "
                    f"strings, got {names!r}")
    kinetic = scheme.kinetic_params(*_scalars(DEFAULT_PARAMS[0]))
    if not isinstance(kinetic, dict) or set(kinetic) != set(names):
        keys = sorted(kinetic) if isinstance(kinetic, dict) else type(kinetic).__name__
        raise _fail(name, "protocol", f"kinetic_params returned {keys}, expected the names "
                    f"of kinetic_param_names {list(names)}")


def _check_shapes(scheme: ReactionScheme, name: str, generator: torch.Generator) -> None:
    mu_n = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)  # (3, 1)
    mu_m = torch.tensor([[1.5, 3.0, 6.0, 9.0]], dtype=torch.float64)  # (1, 4)
    theta = torch.tensor([0.8, 1.0, 2.0, 3.0], dtype=torch.float64)  # (4,)
    shape = (3, 4)
    nascent = torch.arange(12, dtype=torch.float64).reshape(shape) % 4
    mature = torch.arange(12, dtype=torch.float64).reshape(shape) % 5
    outputs = {
        f"kinetic_params()[{k!r}]": (v, shape)
        for k, v in scheme.kinetic_params(mu_n, mu_m, theta).items()
    }
    outputs["log_prob"] = (scheme.log_prob(nascent, mature, mu_n, mu_m, theta), shape)
    outputs["mean"] = (scheme.mean(mu_n, mu_m, theta), (*shape, 2))
    outputs["variance"] = (scheme.variance(mu_n, mu_m, theta), (*shape, 2))
    outputs["covariance"] = (scheme.covariance(mu_n, mu_m, theta), shape)
    draws = scheme.sample(mu_n, mu_m, theta, sample_shape=(5,), generator=generator)
    outputs["sample(sample_shape=(5,))"] = (draws, (5, *shape, 2))
    for what, (value, expected) in outputs.items():
        if not isinstance(value, Tensor):
            raise _fail(name, "shapes", f"{what} returned a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != expected:
            raise _fail(name, "shapes", f"{what} has shape {tuple(value.shape)} for inputs of "
                        f"shapes (3, 1), (1, 4) and (4,); expected {expected}")
        if not bool(torch.isfinite(value).all()):
            raise _fail(name, "shapes", f"{what} has non-finite values")
    if bool((draws < 0).any()) or not bool((draws == torch.round(draws)).all()):
        raise _fail(name, "shapes", "sample() must return non-negative integer counts")


def _grid(scheme: ReactionScheme, name: str, params, grid_sd: float):
    mu_n, mu_m, theta = _scalars(params)
    var = scheme.variance(mu_n, mu_m, theta).detach().double()
    sd = torch.sqrt(var.clamp(min=0.0))
    n_max = int(math.ceil(params[0] + grid_sd * float(sd[0]) + 10))
    m_max = int(math.ceil(params[1] + grid_sd * float(sd[1]) + 10))
    if (n_max + 1) * (m_max + 1) > _MAX_GRID:
        raise _fail(name, "normalisation", f"at {_describe(params)} the grid holding the mass "
                    f"would be {n_max + 1} x {m_max + 1}; choose smaller parameters (params=)")
    n, m = torch.meshgrid(
        torch.arange(n_max + 1, dtype=torch.float64),
        torch.arange(m_max + 1, dtype=torch.float64),
        indexing="ij",
    )
    with torch.no_grad():
        log_p = scheme.log_prob(n, m, mu_n, mu_m, theta).double()
    return n, m, log_p.exp()


def _check_normalisation(scheme, name, params, grid_sd, atol) -> tuple[float, list]:
    worst, grids = 0.0, []
    for p in params:
        n, m, prob = _grid(scheme, name, p, grid_sd)
        if not bool(torch.isfinite(prob).all()) or bool((prob < 0).any()):
            raise _fail(name, "normalisation", f"log_prob gives NaN or +inf at {_describe(p)}")
        total = float(prob.sum())
        if not abs(total - 1.0) <= atol:
            raise _fail(name, "normalisation", f"at {_describe(p)} the probabilities on "
                        f"[0, {n.shape[0] - 1}] x [0, {n.shape[1] - 1}] sum to {total:.6g}, "
                        f"not 1 (tolerance {atol:g})")
        worst = max(worst, abs(total - 1.0))
        grids.append((n, m, prob))
    return worst, grids


def _claimed(scheme, p) -> np.ndarray:
    mu_n, mu_m, theta = _scalars(p)
    mean = scheme.mean(mu_n, mu_m, theta).detach().double().numpy()
    var = scheme.variance(mu_n, mu_m, theta).detach().double().numpy()
    cov = float(scheme.covariance(mu_n, mu_m, theta))
    return np.array([mean[0], mean[1], var[0], var[1], cov])


_MOMENTS = ("mean nascent", "mean mature", "variance nascent", "variance mature", "covariance")


def _check_moments(scheme, name, params, grids, rtol, n_samples, z_max, generator):
    worst_grid, worst_z = 0.0, 0.0
    for p, (n, m, prob) in zip(params, grids, strict=True):
        claimed = _claimed(scheme, p)
        mean_n, mean_m = float((prob * n).sum()), float((prob * m).sum())
        dn, dm = n - mean_n, m - mean_m
        grid = np.array([mean_n, mean_m, float((prob * dn * dn).sum()),
                         float((prob * dm * dm).sum()), float((prob * dn * dm).sum())])
        scale = np.array([1, 1, 1, 1, 0]) * np.abs(claimed) + np.sqrt(claimed[2] * claimed[3])
        err = np.abs(grid - claimed) / scale
        k = int(np.argmax(err))
        if not err[k] <= rtol:
            raise _fail(name, "moments", f"at {_describe(p)} the {_MOMENTS[k]} of the "
                        f"probabilities is {grid[k]:.6g} but the scheme claims "
                        f"{claimed[k]:.6g}")
        worst_grid = max(worst_grid, float(err.max()))
        mu_n, mu_m, theta = _scalars(p)
        with torch.no_grad():
            x = scheme.sample(mu_n, mu_m, theta, sample_shape=(n_samples,), generator=generator)
        x = x.detach().double().reshape(n_samples, 2).numpy()
        c = x - claimed[:2]
        stats = np.stack([x[:, 0], x[:, 1], c[:, 0] ** 2, c[:, 1] ** 2, c[:, 0] * c[:, 1]], 1)
        est = stats.mean(0)
        se = stats.std(0, ddof=1) / math.sqrt(n_samples)
        z = np.abs(est - claimed) / np.maximum(se, 1e-12)
        k = int(np.argmax(z))
        if not z[k] <= z_max:
            raise _fail(name, "moments", f"at {_describe(p)} the {_MOMENTS[k]} of "
                        f"{n_samples} draws of sample() is {est[k]:.6g} +- {se[k]:.2g} but the "
                        f"scheme claims {claimed[k]:.6g} ({z[k]:.1f} standard errors)")
        worst_z = max(worst_z, float(z.max()))
    return worst_grid, worst_z


def _check_gradients(scheme, name, params, grids, rel_step, tol) -> float:
    worst = 0.0
    for p, (_, _, prob) in zip(params, grids, strict=True):
        # Count pairs where the law has mass: the mode, and points around it.
        flat = int(torch.argmax(prob))
        i0, j0 = divmod(flat, prob.shape[1])
        points = {(i0, j0), (0, 0), (i0 + 2, j0), (i0, j0 + 3), (max(i0 - 1, 0), j0 + 1)}
        points = sorted(points)
        nascent = torch.tensor([float(i) for i, _ in points], dtype=torch.float64)
        mature = torch.tensor([float(j) for _, j in points], dtype=torch.float64)
        base = _scalars(p)
        for k, label in enumerate(("mu_nascent", "mu_mature", "theta")):
            auto = torch.stack([
                _grad_point(scheme, nascent[i], mature[i], base, k)
                for i in range(nascent.shape[0])
            ])
            if not bool(torch.isfinite(auto).all()):
                raise _fail(name, "gradients", f"d log_prob / d {label} is not finite at "
                            f"{_describe(p)}")
            h = rel_step * float(base[k])
            up = [v.clone() for v in base]
            down = [v.clone() for v in base]
            up[k] += h
            down[k] -= h
            with torch.no_grad():
                fd = (scheme.log_prob(nascent, mature, *up).double()
                      - scheme.log_prob(nascent, mature, *down).double()) / (2 * h)
            err = (auto.detach().double() - fd).abs() / (1.0 + fd.abs())
            i = int(torch.argmax(err))
            if not float(err[i]) <= tol:
                raise _fail(name, "gradients", f"at {_describe(p)}, (n, m) = "
                            f"({int(nascent[i])}, {int(mature[i])}): d log_prob / d {label} is "
                            f"{float(auto[i]):.6g} by autograd but {float(fd[i]):.6g} by finite "
                            "differences")
            worst = max(worst, float(err.max()))
    return worst


def _grad_point(scheme, nascent: Tensor, mature: Tensor, base: list[Tensor], k: int) -> Tensor:
    leaves = [v.clone().requires_grad_(True) for v in base]
    out = scheme.log_prob(nascent, mature, *leaves)
    (g,) = torch.autograd.grad(out, [leaves[k]], allow_unused=True)
    return torch.zeros((), dtype=torch.float64) if g is None else g.double()


def check_scheme(
    scheme: ReactionScheme,
    params: Sequence[tuple[float, float, float]] | None = None,
    *,
    n_samples: int = 20_000,
    grid_sd: float = 12.0,
    atol: float = 1e-3,
    moment_rtol: float = 0.02,
    z_max: float = 5.0,
    gradient_tol: float = 1e-2,
    seed: int = 0,
) -> SchemeReport:
    """Check that a reaction scheme is a sound probability law with consistent methods.

    Parameters
    ----------
    scheme
        The scheme to check (a :class:`~pybivi.schemes.ReactionScheme` instance).
    params
        ``(mu_nascent, mu_mature, theta)`` sets to check at (default
        :data:`DEFAULT_PARAMS`); keep the means moderate so that the grid stays small.
    n_samples
        Draws of ``sample`` per parameter set for the Monte Carlo moments.
    grid_sd
        The summation grid reaches this many (claimed) standard deviations past the mean.
    atol
        Tolerance on ``|sum of probabilities - 1|``.
    moment_rtol
        Relative tolerance of the grid moments against the claimed ones (the covariance
        relative to ``sqrt(Var N Var M)``).
    z_max
        Largest accepted Monte Carlo deviation, in standard errors.
    gradient_tol
        Largest accepted ``|autograd - finite difference| / (1 + |finite difference|)``.
    seed
        Seed of the sampler's generator.

    Returns
    -------
    SchemeReport
        The worst deviation measured by each check.

    Raises
    ------
    TypeError
        ``scheme`` is not a :class:`~pybivi.schemes.ReactionScheme`.
    SchemeCheckError
        An :class:`AssertionError` naming the failed check (``protocol``, ``shapes``,
        ``normalisation``, ``moments`` or ``gradients``) and the parameters.

    Examples
    --------
    >>> from pybivi import schemes
    >>> from pybivi.schemes.testing import check_scheme
    >>> report = check_scheme(schemes.get("extrinsic"), n_samples=2000)
    >>> sorted(report.measures)
    ['gradients', 'moments_grid', 'moments_samples', 'normalisation']
    """
    if not isinstance(scheme, ReactionScheme):
        raise TypeError(f"check_scheme needs a ReactionScheme instance, got "
                        f"{type(scheme).__name__}")
    params = tuple(tuple(float(v) for v in p) for p in (params or DEFAULT_PARAMS))
    if not params or any(len(p) != 3 or min(p) <= 0 for p in params):
        raise ValueError("params must be (mu_nascent, mu_mature, theta) triples of positive "
                         f"numbers, got {params}")
    if n_samples < 100:
        raise ValueError(f"n_samples must be at least 100, got {n_samples}")
    name = getattr(scheme, "name", type(scheme).__name__)
    generator = torch.Generator().manual_seed(int(seed))
    _check_protocol(scheme, name)
    _check_shapes(scheme, name, generator)
    norm, grids = _check_normalisation(scheme, name, params, grid_sd, atol)
    grid_err, z = _check_moments(scheme, name, params, grids, moment_rtol, n_samples, z_max,
                                 generator)
    grad = _check_gradients(scheme, name, params, grids, 1e-3, gradient_tol)
    measures = {"normalisation": norm, "moments_grid": grid_err, "moments_samples": z,
                "gradients": grad}
    return SchemeReport(name=name, params=params, measures=measures)
