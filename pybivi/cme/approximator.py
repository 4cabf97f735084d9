"""The shipped neural approximation of the bursty conditional ``P(m | n)``.

Representation
--------------
``Phat(m | n) = sum_j w_j NB(m; mean exp(L_j), shape r)``: ``K`` negative-binomial
kernels that share one shape ``r`` per pair, so the expensive ``lgamma`` terms are
computed once per pair, not once per kernel (SPEC section 5 measures the ten-kernel
``lgamma`` work alone at about 0.06 s per 256,000 pairs). The kernel log-means sit at
standard-normal nodes ``z_j`` of a *Poisson-lognormal* moment match of the mature
count given ``n``:

* the nascent rate given ``N = n`` is exactly ``Gamma(1/beta + n, scale b/(1+b))``
  (``N`` is a Poisson-Gamma mixture), which gives the mean and variance of its log;
* the rates' excess variances over Poisson (``Var - E``) give the lognormal variances
  ``log(1 + beta)`` (nascent) and ``log(1 + beta gamma / (beta + gamma))`` (mature,
  equal to the log-covariance), hence a Gaussian regression of the mature log-rate on
  the nascent one.

As ``b -> 0`` with fixed means (``beta, gamma -> 0``) the spread vanishes and the
kernels collapse on ``Poisson(mu_M)``: the constitutive limit is in the family. A small
MLP corrects the centre, the spread, the shared shape and the kernel weights. All of it
is differentiable in ``(b, beta, gamma)``; the weights are frozen (``requires_grad`` off).

Behaviour outside the domain
----------------------------
The domain is the training box of :data:`pybivi.cme.training_data.BOX` cut by the state
cap (:func:`pybivi.cme.training_data.inside_state_cap`). For any finite positive input:

* ``b < 10**-3``: the exact small-burst limit, ``M`` independent of ``N`` and
  ``Poisson(b / gamma)`` (bursts become single molecules);
* otherwise the MLP sees its inputs clamped to the domain (``log b, log beta, log gamma``
  clamped to the box, ``n`` to ``STATE_CAP``) while the kernels keep the pair's own
  moment-matched centre and spread, so means and scales stay right;
* one :class:`UserWarning` per approximator object reports how many pairs fell outside
  (box, or ``mean + 10 sd`` of either species beyond the state cap); ``outside_count``
  keeps the running total. Results are always finite.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from pybivi.cme.domain import BOX, STATE_CAP

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "bursty_conditional.pt"
DEFAULT_METADATA = WEIGHTS_DIR / "bursty_conditional.json"

B_SMALL = 1e-3  # below this burst size the exact small-b limit is used
_LOG_R_MIN, _LOG_R_MAX = math.log(1e-2), math.log(1e6)
_SIGMA_MAX = 4.0  # log-scale spread cap: beyond it the lognormal picture is meaningless


def _box_tensor() -> tuple[Tensor, Tensor]:
    ln10 = math.log(10.0)
    lo = torch.tensor([BOX[k][0] * ln10 for k in ("log10_b", "log10_beta", "log10_gamma")])
    hi = torch.tensor([BOX[k][1] * ln10 for k in ("log10_b", "log10_beta", "log10_gamma")])
    return lo, hi


def _digamma_trigamma(a: Tensor) -> tuple[Tensor, Tensor]:
    """Cheap smooth ``digamma(a)`` and ``trigamma(a)`` (one recurrence step + asymptotics).

    Accurate to about 1% at ``a -> 0`` and far better for ``a >= 1``; enough for the
    moment match, which the MLP corrects anyway. ``torch.polygamma(1, .)`` would make
    the backward pass call ``polygamma(2, .)``, about 100 times slower than a log.
    """
    x = a + 1.0
    inv = 1.0 / x
    inv2 = inv * inv
    psi = torch.log(x) - 0.5 * inv - inv2 * (1.0 / 12.0 - inv2 / 120.0) - 1.0 / a
    tri = inv + inv2 * (0.5 + inv * (1.0 / 6.0 - inv2 / 30.0)) + 1.0 / (a * a)
    return psi, tri


def moment_base(n: Tensor, b: Tensor, beta: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """Centre and spread of the Poisson-lognormal match of the mature log-rate given ``N = n``.

    Returns ``(c, sigma)`` such that ``log Lambda_M | n`` is about ``Normal(c, sigma^2)``.
    """
    s2n = torch.log1p(beta)
    s2m = torch.log1p(beta * gamma / (beta + gamma))
    kappa = s2m / s2n  # regression slope of the mature on the nascent log-rate, in (0, 1)
    shape0 = 1.0 / beta
    psi_n, tri_n = _digamma_trigamma(shape0 + n)
    psi_0, _ = _digamma_trigamma(shape0)
    # E[log Lambda_N | n] - E[log Lambda_N] under the exact Gamma prior and posterior
    shift = psi_n - psi_0 - torch.log1p(b)
    c = torch.log(b / gamma) - 0.5 * s2m + kappa * shift
    var = s2m * (1.0 - kappa) + kappa**2 * tri_n
    sigma = torch.sqrt(var.clamp(min=1e-12)).clamp(max=_SIGMA_MAX)
    return c, sigma


def nodes(k: int) -> Tensor:
    """Chebyshev-spaced standard-normal quantiles (biVI's kernel placement), float32."""
    j = torch.arange(k, dtype=torch.float64)
    q = 0.5 * (1.0 - torch.cos((2.0 * j + 1.0) / (2.0 * k) * math.pi))
    return (math.sqrt(2.0) * torch.erfinv(2.0 * q - 1.0)).float()


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + e^x)`` for ``x <= 80`` (callers guarantee it), without subnormal floats.

    Three vectorised ops; torch's ``softplus`` kernel measured several times slower here.
    Clamping at -80 changes the value by less than ``e^-80``.
    """
    return torch.log1p(torch.exp(x.clamp(min=-80.0)))


class ConditionalNet(nn.Module):
    """MLP giving the kernel weights and corrections, plus the kernel evaluation.

    Parameters
    ----------
    n_kernels
        Number of NB kernels ``K``.
    width, depth
        Hidden width and number of hidden layers.
    activation
        ``"relu"`` (default: the cheapest on a CPU, forward and backward) or ``"silu"``
        (smooth, but its exponentials underflow to subnormal floats for large inputs,
        measured 10 to 40 times slower per layer here).
    """

    n_features = 7

    def __init__(
        self, n_kernels: int = 10, width: int = 32, depth: int = 2, activation: str = "relu"
    ) -> None:
        super().__init__()
        if activation not in ("relu", "silu"):
            raise ValueError(f"activation must be 'relu' or 'silu', got {activation!r}")
        act = nn.ReLU if activation == "relu" else nn.SiLU
        layers: list[nn.Module] = []
        d = self.n_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), act()]
            d = width
        layers.append(nn.Linear(d, n_kernels + 3))
        self.mlp = nn.Sequential(*layers)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        z = nodes(n_kernels)
        self.register_buffer("z", z)
        self.register_buffer("dz", (z[1:] - z[:-1]).mean().reshape(()))
        self.config = {
            "n_kernels": n_kernels,
            "width": width,
            "depth": depth,
            "activation": activation,
        }

    def features(
        self, n: Tensor, lb: Tensor, lbeta: Tensor, lgamma: Tensor, c: Tensor, sigma: Tensor
    ) -> Tensor:
        """MLP inputs (about unit scale) from log-parameters already clamped to the box."""
        ln10 = math.log(10.0)
        mu_m = lb - lgamma
        return torch.stack(
            [
                lb / (3 * ln10),
                lbeta / (2 * ln10),
                (lgamma + 0.5 * ln10) / (2.5 * ln10),
                torch.log1p(n) / 4.0 - 1.0,
                (c - mu_m) / 2.0,
                torch.log(sigma + 1e-3),
                (mu_m - torch.log1p(n)) / 5.0,
            ],
            dim=-1,
        )

    def heads(self, feats: Tensor, c: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Kernel log-means ``(K, ...)``, log-weights ``(K, ...)`` and log shape ``(...)``.

        The kernel axis comes first so that the per-kernel arithmetic and the reduction
        over kernels run over contiguous pairs.
        """
        out = torch.movedim(self.mlp(feats), -1, 0).contiguous()
        k = self.z.numel()
        logw = torch.log_softmax(out[:k], dim=0)
        centre = c + out[k]
        spread = sigma * torch.exp(out[k + 1].clamp(-6.0, 3.0))
        z = self.z.reshape((k,) + (1,) * centre.dim())
        # Means above e^30 never occur in the domain; the cap keeps exp() finite anywhere.
        log_means = (centre + spread * z).clamp(max=30.0)
        log_r = -2.0 * torch.log(spread * self.dz + 1e-3) + out[k + 2]
        return log_means, logw, log_r.clamp(_LOG_R_MIN, _LOG_R_MAX)


def _omega(x: Tensor) -> Tensor:
    """Stirling remainder ``lgamma(x) - (x - 1/2) log x + x - log(2 pi) / 2`` for ``x >= 8``."""
    inv = 1.0 / x
    inv2 = inv * inv
    return inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0))


def log_rising_ratio(m: Tensor, log_r: Tensor) -> Tensor:
    """``lgamma(m + r) - lgamma(r) - m log r``, accurate in float32 for every ``r``.

    For ``r >= 8`` the Stirling form ``(m + r - 1/2) log1p(m / r) - m + omega(m + r) -
    omega(r)`` has no cancellation of terms of size ``m log r``; below, lgamma is direct.
    """
    r = torch.exp(log_r)
    big = r >= 8.0
    rb = torch.where(big, r, torch.full_like(r, 8.0))
    stirling = (m + rb - 0.5) * torch.log1p(m / rb) - m + _omega(m + rb) - _omega(rb)
    rs = torch.where(big, torch.ones_like(r), r)
    direct = torch.lgamma(m + rs) - torch.lgamma(rs) - m * torch.log(rs)
    return torch.where(big, stirling, direct)


def nb_mixture_log_prob(m: Tensor, log_means: Tensor, logw: Tensor, log_r: Tensor) -> Tensor:
    """``log sum_j w_j NB(m; exp(L_j), r)`` with one shape ``r`` per pair.

    ``log_means`` and ``logw`` have the kernel axis FIRST, ``(K, ...)`` (reductions over a
    leading axis vectorise over pairs). ``log NB = S(m, r) + m (L_j - t_j) - r t_j -
    lgamma(m + 1)`` with ``t_j = log(1 + mu_j / r) = softplus(L_j - log r)`` and ``S``
    from :func:`log_rising_ratio`: only ``S`` and ``lgamma(m + 1)`` need lgamma, once
    per pair.
    """
    shared = log_rising_ratio(m, log_r) - torch.lgamma(m + 1.0)
    t = _softplus(log_means - log_r)
    per = logw + m * (log_means - t) - torch.exp(log_r) * t
    top = per.amax(dim=0).detach()  # a constant shift: no gradient needed through it
    # Clamping the shifted terms at -80 keeps exp() out of the subnormal range (far slower
    # on CPUs) and changes the sum by less than K e^-80.
    return shared + top + torch.log(torch.exp((per - top).clamp(min=-80.0)).sum(dim=0))


class BurstyConditional(nn.Module):
    """Frozen approximation of the bursty ``log P(m | n)`` (see the module docstring).

    Use :func:`load_default_approximator` rather than constructing it directly.

    Parameters
    ----------
    net
        The trained network.
    metadata
        The weights' metadata (domain, training, held-out metrics, checksum).
    compute_dtype
        Arithmetic precision: ``torch.float32`` (default, fast) or ``torch.float64``
        (slower; removes float32 rounding of about ``1e-7 m log m`` at large counts).
    """

    def __init__(
        self,
        net: ConditionalNet,
        metadata: dict | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.net = net.to(compute_dtype)
        self.compute_dtype = compute_dtype
        self.metadata = dict(metadata or {})
        self.outside_count = 0
        self._warned = False
        lo, hi = _box_tensor()
        self.register_buffer("box_lo", lo.to(compute_dtype))
        self.register_buffer("box_hi", hi.to(compute_dtype))
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def domain(self) -> dict:
        """The domain the network was trained on, and the rules used outside it."""
        return {
            "box_log10": {k: list(v) for k, v in BOX.items()},
            "state_cap": STATE_CAP,
            "state_cap_rule": "1 - 1e-10 NB-matched quantile of each species below state_cap",
            "small_b": B_SMALL,
            "outside": "b < small_b: Poisson(b / gamma) independent of n; otherwise MLP inputs "
            "clamped to the box and n <= state_cap, kernels at the pair's own moments",
        }

    def _outside(self, n: Tensor, b: Tensor, beta: Tensor, gamma: Tensor, logs: Tensor) -> Tensor:
        out = ((logs < self.box_lo) | (logs > self.box_hi)).any(dim=-1)
        for mean, var in (
            (b / beta, b / beta * (1 + b)),
            (b / gamma, b / gamma * (1 + b * beta / (beta + gamma))),
        ):
            out |= mean + 10.0 * torch.sqrt(var) > STATE_CAP
        return out | (n > STATE_CAP)

    def log_prob_mature_given_nascent(
        self, nascent: Tensor, mature: Tensor, b: Tensor, beta: Tensor, gamma: Tensor
    ) -> Tensor:
        """``log Phat(m | n)`` for broadcastable tensors; differentiable in ``b, beta, gamma``.

        Parameters
        ----------
        nascent, mature
            Non-negative integer counts (any numeric dtype).
        b, beta, gamma
            Burst size and splicing/degradation rates in units of the burst frequency,
            finite and positive.

        Returns
        -------
        Tensor
            Float log-probabilities of the broadcast shape, in the floating dtype of the
            inputs (computed in ``compute_dtype``, float32 by default).
        """
        dtype = next(
            (t.dtype for t in (b, beta, gamma) if torch.is_tensor(t) and t.is_floating_point()),
            torch.get_default_dtype(),
        )
        ts = torch.broadcast_tensors(
            *(torch.as_tensor(t) for t in (nascent, mature, b, beta, gamma))
        )
        n, m, b, beta, gamma = (t.to(self.compute_dtype) for t in ts)
        with torch.no_grad():  # bookkeeping only: no graph for it
            logs = torch.stack([torch.log(b), torch.log(beta), torch.log(gamma)], dim=-1)
            outside = self._outside(n, b, beta, gamma, logs)
            small = b < B_SMALL
            n_out = int(outside.sum())
        if n_out:
            self.outside_count += n_out
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"{n_out} of {outside.numel()} (n, m) pairs fell outside the approximator's "
                    f"domain ({int(small.sum())} with b < {B_SMALL}: small-burst Poisson limit; "
                    "others: clamped network inputs). Further counts accumulate in "
                    "`outside_count` without warnings.",
                    UserWarning,
                    stacklevel=2,
                )
        shape = n.shape
        out = _PairwiseLogProb.apply(
            self, *(t.reshape(-1) for t in (n, m, b, beta, gamma))
        ).reshape(shape)
        return out.to(dtype)

    def _mlp_weights(self) -> list[Tensor]:
        """``[W_1, b_1[:, None], ...]``: the frozen MLP's layers for feature-major inputs."""
        layers = [mod for mod in self.net.mlp if isinstance(mod, nn.Linear)]
        return [t for lin in layers for t in (lin.weight.detach(), lin.bias.detach()[:, None])]

    def _pairs_log_prob(self, n: Tensor, m: Tensor, b: Tensor, beta: Tensor, gamma: Tensor):
        """``log Phat(m | n)`` for one block of pairs (1-D tensors in ``compute_dtype``).

        The plain autograd-traceable computation; :class:`_PairwiseLogProb` runs it on
        cache-sized blocks and differentiates it block by block.
        """
        lo, hi = self.box_lo, self.box_hi
        lb = torch.log(b).clamp(lo[0], hi[0])
        lbeta = torch.log(beta).clamp(lo[1], hi[1])
        lgam = torch.log(gamma).clamp(lo[2], hi[2])
        c, sigma = moment_base(n, b, beta, gamma)
        feats = self.net.features(n.clamp(max=STATE_CAP), lb, lbeta, lgam, c, sigma)
        if isinstance(self.net.mlp[1], nn.ReLU):  # the fused path assumes ReLU layers
            out = _HeadsMixture.apply(feats.t(), c, sigma, m, self.net, self._mlp_weights())
        else:
            log_means, logw, log_r = self.net.heads(feats, c, sigma)
            out = nb_mixture_log_prob(m, log_means, logw, log_r)
        small = b < B_SMALL
        if bool(small.any()):
            mu = b / gamma
            poisson = m * torch.log(mu) - mu - torch.lgamma(m + 1.0)
            out = torch.where(small, poisson, out)
        return out

    def forward(self, nascent, mature, b, beta, gamma):  # noqa: D102 - alias for nn.Module use
        return self.log_prob_mature_given_nascent(nascent, mature, b, beta, gamma)


def _log_rising_ratio_dlogr(m: Tensor, log_r: Tensor) -> Tensor:
    """``d/d log r`` of :func:`log_rising_ratio`: ``r (psi(m + r) - psi(r)) - m``.

    For ``r >= 8`` it differentiates the Stirling form term by term (no cancellation of
    two digammas of size ``log r``), exactly as autograd would; below, digamma directly.
    """
    r = torch.exp(log_r)
    big = r >= 8.0
    rb = torch.where(big, r, torch.full_like(r, 8.0))
    mr = m + rb

    def domega(x: Tensor) -> Tensor:  # the derivative of _omega
        inv2 = 1.0 / (x * x)
        return inv2 * (-1.0 / 12.0 + inv2 * (1.0 / 120.0 - inv2 / 252.0))

    stirling = rb * (torch.log1p(m / rb) - (mr - 0.5) * m / (rb * mr) + domega(mr) - domega(rb))
    rs = torch.where(big, torch.ones_like(r), r)
    direct = rs * (torch.digamma(m + rs) - torch.digamma(rs)) - m
    return torch.where(big, stirling, direct)


class _HeadsMixture(torch.autograd.Function):
    """:meth:`ConditionalNet.heads` then :func:`nb_mixture_log_prob`, with a closed-form backward.

    Inputs: feature-major MLP inputs ``(7, pairs)``, the moment-matched ``c`` and
    ``sigma``, the counts ``m``, the net and its frozen ReLU layers; gradients flow to
    the features, ``c`` and ``sigma``. With ``rho_j`` the kernel responsibilities
    (softmax of the per-kernel terms ``u_j``) and ``s_j = mu_j / (mu_j + r)``:
    ``d/dL_j = rho_j (m - (m + r) s_j)``, ``d/dlogit_j = rho_j - w_j`` and
    ``d/dlog r = sum_j rho_j ((m + r) s_j - r t_j) + dS/dlog r``. The (kernels, pairs)
    arithmetic is about half of what autograd records for the same forward.
    """

    @staticmethod
    def forward(ctx, x, c, sigma, m, net, wb):  # noqa: D102
        hidden = []
        h = x
        n_layers = len(wb) // 2
        for i in range(n_layers):
            h = torch.addmm(wb[2 * i + 1], wb[2 * i], h)
            if i < n_layers - 1:
                h = h.relu_()
                hidden.append(h)
        o = h
        k = net.z.numel()
        logw = torch.log_softmax(o[:k], dim=0)
        es = torch.exp(o[k + 1].clamp(-6.0, 3.0))
        spread = sigma * es
        z = net.z[:, None]
        raw_means = (c + o[k]) + spread * z
        log_means = raw_means.clamp(max=30.0)
        sd = spread * net.dz + 1e-3
        raw_log_r = -2.0 * torch.log(sd) + o[k + 2]
        log_r = raw_log_r.clamp(_LOG_R_MIN, _LOG_R_MAX)
        shared = log_rising_ratio(m, log_r) - torch.lgamma(m + 1.0)
        r = torch.exp(log_r)
        # In-place chains below: the same arithmetic as nb_mixture_log_prob, without a
        # fresh (K, pairs) buffer per step (these passes are memory-bound).
        e = torch.sub(log_means, log_r).clamp_(min=-80.0).exp_()
        t = torch.log1p(e)
        # (r * t subtracted separately: a fused multiply-add would round differently)
        per = torch.sub(log_means, t).mul_(m).add_(logw).sub_(r * t)
        top = per.amax(dim=0)
        q = per.sub_(top).clamp_(min=-80.0).exp_()
        total = q.sum(dim=0)
        ctx.save_for_backward(
            *hidden, m, logw, o[k + 1], es, sigma, raw_means, sd, raw_log_r, e, t, q, total
        )
        ctx.net, ctx.wb, ctx.n_hidden = net, wb, len(hidden)
        return shared + top + torch.log(total)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        saved = ctx.saved_tensors
        hidden = saved[: ctx.n_hidden]
        m, logw, o_spread, es, sigma, raw_means, sd, raw_log_r, e, t, q, total = saved[
            ctx.n_hidden :
        ]
        net = ctx.net
        k = net.z.numel()
        log_r = raw_log_r.clamp(_LOG_R_MIN, _LOG_R_MAX)
        r = torch.exp(log_r)
        mr = m + r
        rho = q.div_(total)  # q is not needed afterwards
        s = e.div_(e + 1.0)  # sigmoid(L - log r) = mu / (mu + r), in e's buffer
        rs = s.mul_(rho)
        g_log_r = mr * rs.sum(dim=0) - r * (rho * t).sum(dim=0)
        g_means = torch.mul(rho, m).addcmul_(rs, mr, value=-1.0)
        if bool(raw_means.amax() > 30.0):  # the clamp at 30 stops the gradient (rare)
            g_means.mul_(raw_means <= 30.0)
        g_log_r = g_log_r + _log_rising_ratio_dlogr(m, log_r)
        g_log_r = g_log_r * ((raw_log_r >= _LOG_R_MIN) & (raw_log_r <= _LOG_R_MAX))
        g_centre = g_means.sum(dim=0)
        g_spread = (g_means * net.z[:, None]).sum(dim=0) - g_log_r * (2.0 * net.dz) / sd
        go = torch.empty((k + 3,) + grad.shape, dtype=grad.dtype, device=grad.device)
        torch.sub(rho, logw.exp_(), out=go[:k])  # through log_softmax: rho_j - w_j
        go[k] = g_centre
        go[k + 1] = g_spread * sigma * es * ((o_spread >= -6.0) & (o_spread <= 3.0))
        go[k + 2] = g_log_r
        go *= grad
        g = go
        weights = ctx.wb[0::2]
        for i in range(len(weights) - 1, 0, -1):
            g = torch.ops.aten.threshold_backward(weights[i].t() @ g, hidden[i - 1], 0.0)
        g_x = weights[0].t() @ g
        return g_x, g_centre * grad, g_spread * es * grad, None, None, None


# Pairs per block: each block's temporaries ((K, pairs) kernel terms, (width, pairs)
# activations) stay within the CPU caches while per-op dispatch costs stay small;
# 16384 measured fastest of 2048 to 32768 at one thread (forward + backward).
_BLOCK = 16384


class _PairwiseLogProb(torch.autograd.Function):
    """``log Phat(m | n)`` over 1-D pairs, evaluated in blocks, with a diagonal Jacobian.

    Each output depends only on its own pair's ``(b, beta, gamma)``, so the gradient of
    the block's *sum* is the vector of per-pair partial derivatives. The forward pass
    computes them block by block (a small local autograd graph that dies with the
    block) and the backward pass is three multiplications. Double backward is not
    supported (nothing in pybivi needs it).
    """

    @staticmethod
    def forward(ctx, model, n, m, b, beta, gamma):  # noqa: D102
        want = tuple(ctx.needs_input_grad[3:6])
        out = torch.empty_like(b)
        derivs = [torch.empty_like(b) if w else None for w in want]
        for i in range(0, b.numel(), _BLOCK):
            sl = slice(i, i + _BLOCK)
            args = [t[sl] for t in (n, m, b, beta, gamma)]
            if not any(want):
                out[sl] = model._pairs_log_prob(*args)
                continue
            with torch.enable_grad():
                leaves = [a.detach().requires_grad_(w) for a, w in zip(args[2:], want, strict=True)]
                val = model._pairs_log_prob(*args[:2], *leaves)
                inputs = [x for x, w in zip(leaves, want, strict=True) if w]
                grads = iter(torch.autograd.grad(val.sum(), inputs, allow_unused=True))
            out[sl] = val.detach()
            for d, w in zip(derivs, want, strict=True):
                if w:
                    g = next(grads)
                    if g is None:  # the value does not depend on this input here
                        d[sl] = 0.0
                    else:
                        d[sl] = g
        ctx.save_for_backward(*(d for d in derivs if d is not None))
        ctx.want = want
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        saved = iter(ctx.saved_tensors)
        grads = [grad_out * next(saved) if w else None for w in ctx.want]
        return (None, None, None, *grads)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_approximator(net: ConditionalNet, out_dir: Path, metadata: dict) -> Path:
    """Write ``bursty_conditional.pt`` and its metadata JSON (with the checksum) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / DEFAULT_WEIGHTS.name
    state = {k: v.detach().cpu().float() for k, v in net.state_dict().items()}
    torch.save({"config": net.config, "state_dict": state}, path)
    meta = dict(metadata)
    meta["config"] = net.config
    meta["sha256"] = sha256_of(path)
    meta["weights_file"] = path.name
    (out_dir / DEFAULT_METADATA.name).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def load_approximator(
    path: str | Path, verify: bool = True, compute_dtype: torch.dtype = torch.float32
) -> BurstyConditional:
    """Load an approximator written by :func:`save_approximator`.

    Parameters
    ----------
    path
        The ``.pt`` weights file; its metadata JSON must sit beside it.
    verify
        Check the file's SHA-256 against the metadata (raises ``ValueError`` on mismatch).
    compute_dtype
        Arithmetic precision of the returned object (see :class:`BurstyConditional`).
    """
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"approximator weights or metadata missing: {path}, {meta_path}")
    meta = json.loads(meta_path.read_text())
    if verify and sha256_of(path) != meta.get("sha256"):
        raise ValueError(
            f"checksum mismatch for {path}: the weights file does not match its metadata"
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    config = {"activation": "silu", **blob["config"]}  # files written before the option
    net = ConditionalNet(**config)
    net.load_state_dict(blob["state_dict"])
    net.eval()
    return BurstyConditional(net, meta, compute_dtype).eval()


@lru_cache(maxsize=1)
def load_default_approximator() -> BurstyConditional:
    """The shipped approximator, loaded once per process and checksum-verified."""
    return load_approximator(DEFAULT_WEIGHTS)
