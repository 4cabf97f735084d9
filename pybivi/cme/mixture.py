"""The negative-binomial mixture of the bursty approximator, and its fused autograd.

:func:`nodes` and :func:`pybivi.cme.moments.moment_base` place the kernels (a
Poisson-lognormal moment match of the mature count given ``n``, see
:mod:`pybivi.cme.approximator`).

:func:`nb_mixture_log_prob` is the plain, autograd-traceable mixture
``log sum_j w_j NB(m; mu_j, r)`` with one shape ``r`` per pair, written so that only two
lgamma evaluations per pair are needed whatever the number of kernels.
:func:`heads_mixture_forward` and :func:`heads_mixture_backward` compute the network heads
and the same mixture with a closed-form backward pass, and ``PairwiseLogProb`` turns them
into per-pair derivatives over blocks of pairs: that is what
:class:`pybivi.cme.approximator.BurstyConditional` runs; the tests compare it with the plain
computation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pybivi.cme._parallel import map_chunks

# Bounds of the shared NB shape r (log scale): the network's output is clamped to them.
LOG_R_MIN, LOG_R_MAX = math.log(1e-2), math.log(1e6)


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


def _stirling_rising(m: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`log_rising_ratio`'s Stirling form and its ``d/d log r``, for ``r >= 8``.

    The derivative differentiates the series term by term (no cancellation of two
    digammas of size ``log r``), exactly as autograd would. (:func:`log_rising_ratio`
    writes the value out itself, so that training's autograd graph is unchanged.)
    """
    mr = m + r
    lq = torch.log1p(m / r)
    # the Stirling remainders at m + r and r, and their derivatives, for both arguments
    # at once: one (2, pairs) tensor halves the number of operations
    both = torch.stack([mr, r])
    omega = _omega(both)
    inv = both.reciprocal_()
    sq = inv * inv
    domega = sq * (-1.0 / 12.0 + sq * (1.0 / 120.0 - sq / 252.0))
    value = (mr - 0.5) * lq - m + (omega[0] - omega[1])
    deriv = r * (lq - (mr - 0.5) * m * inv[1] * inv[0] + (domega[0] - domega[1]))
    return value, deriv


def _direct_rising(m: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`log_rising_ratio` and its ``d/d log r`` from lgamma and digamma (``r < 8``)."""
    value = torch.lgamma(m + r) - torch.lgamma(r) - m * torch.log(r)
    deriv = r * (torch.digamma(m + r) - torch.digamma(r)) - m
    return value, deriv


def _count_terms(m: Tensor, log_r: Tensor) -> tuple[Tensor, Tensor]:
    """``S(m, r) - lgamma(m + 1)`` (see :func:`log_rising_ratio`) and ``dS / d log r``.

    ``dS / d log r = r (psi(m + r) - psi(r)) - m``. All three terms vanish exactly for
    ``m = 0`` and ``m = 1``, most of the pairs of real data, so only the pairs with
    ``m >= 2`` are evaluated, each by its own branch (Stirling's series for ``r >= 8``,
    lgamma and digamma below): lgamma and digamma cost as much as a dozen arithmetic
    passes.
    """
    value, deriv = torch.zeros_like(m), torch.zeros_like(m)
    r = torch.exp(log_r)
    big = r >= 8.0
    several = m >= 2.0
    for branch, chosen in ((_stirling_rising, several & big), (_direct_rising, several & ~big)):
        idx = chosen.nonzero().squeeze(1)
        if idx.numel():
            m_idx = m[idx]
            v, d = branch(m_idx, r[idx])
            value[idx], deriv[idx] = v.sub_(torch.lgamma(m_idx + 1.0)), d
    return value, deriv


_LOG2E = 1.0 / math.log(2.0)


def _exp_(x: Tensor) -> Tensor:
    """``exp(x)`` in place for ``x <= 0``, as ``2 ** (x log2 e)``; below -80 it gives e^-80.

    torch's float32 ``exp2`` measured about 3 times faster than its ``exp`` on this
    package's reference CPU (``benchmarks/approximator_breakdown.py``). The scaling adds a
    relative error of about ``|x| * 6e-8``, so the absolute error ``|x| e^x * 6e-8`` stays
    below 3e-8 for the non-positive arguments it gets (shifted log-weights). The clamp keeps
    results out of the subnormal range (slow on CPUs) and changes a sum by less than
    ``e^-80`` per term.
    """
    return x.mul_(_LOG2E).clamp_(min=-80.0 * _LOG2E).exp2_()


def heads_mixture_forward(x, c, sigma, m, net, wb) -> tuple[Tensor, tuple]:
    """:meth:`ConditionalNet.heads` then :func:`nb_mixture_log_prob` for one block of pairs.

    Inputs: feature-major MLP inputs ``(7, pairs)``, the moment-matched ``c`` and
    ``sigma``, the counts ``m``, the net and its frozen ReLU layers (see
    ``BurstyConditional._mlp_weights``). Returns the log-probabilities and the state
    :func:`heads_mixture_backward` needs. Call it without gradient recording (it works
    in place on its temporaries).
    """
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
    o_spread = o[k + 1].clamp(-6.0, 3.0)
    spread_free = o_spread == o[k + 1]  # where the clamp lets the gradient through
    es = o_spread.exp_()
    spread = sigma * es
    # The (kernels, pairs) passes are memory-bound: each one below is a single kernel call,
    # in place where possible (the arithmetic is that of nb_mixture_log_prob).
    log_means = torch.addcmul(c + o[k], spread, net.z[:, None])
    # Means beyond e^30 never arise from real inputs; clamp only when one does.
    over = None
    if bool(log_means.amax() > 30.0):
        over = log_means > 30.0
        log_means.clamp_(max=30.0)
    sd = spread * net.dz + 1e-3
    raw_log_r = torch.log(sd).mul_(-2.0).add_(o[k + 2])
    log_r = raw_log_r.clamp(LOG_R_MIN, LOG_R_MAX)
    shared, rising_dlogr = _count_terms(m, log_r)
    r = torch.exp(log_r)
    # exact exp here: t multiplies m + r, which reaches 1e6, so e needs every bit
    e = torch.sub(log_means, log_r).clamp_(min=-80.0).exp_()
    t = torch.log1p(e)
    # (r * t subtracted separately: a fused multiply-add would round differently)
    per = torch.sub(log_means, t).mul_(m).add_(logw).sub_(r * t)
    top = per.amax(dim=0)
    q = _exp_(per.sub_(top))
    total = q.sum(dim=0)
    r_free = raw_log_r == log_r  # where the clamp of log r lets the gradient through
    saved = (m, r, logw, spread_free, es, spread, over, sd, r_free, rising_dlogr, e, t, q, total)
    return shared.add_(top).add_(torch.log(total)), (hidden, saved, net, wb)


def heads_mixture_backward(state: tuple) -> tuple[Tensor, ...]:
    """Closed-form gradients of :func:`heads_mixture_forward`'s output.

    With ``rho_j`` the kernel responsibilities (softmax of the per-kernel terms ``u_j``)
    and ``s_j = mu_j / (mu_j + r)``: ``d/dL_j = rho_j (m - (m + r) s_j)``,
    ``d/dlogit_j = rho_j - w_j`` and ``d/dlog r = sum_j rho_j ((m + r) s_j - r t_j) +
    dS/dlog r``. The sums over kernels of ``rho_j``, ``rho_j s_j`` and their products
    with the nodes ``z_j`` are small matrix products, so only about ten (kernels, pairs)
    passes remain. Returns the per-pair ``(d/dx, d/dc, d/dsigma)`` of the output. The
    state's buffers are reused: call it once.
    """
    hidden, saved, net, wb = state
    m, r, logw, spread_free, es, spread, over, sd, r_free, rising_dlogr, e, t, q, total = saved
    k = net.z.numel()
    mr = m + r
    rho = q.div_(total)  # q is not needed afterwards
    s = e.div_(e + 1.0)  # sigmoid(L - log r) = mu / (mu + r), in e's buffer
    rs = s.mul_(rho)
    ones_z = torch.stack([torch.ones_like(net.z), net.z])  # (2, kernels)
    rs_sums = ones_z @ rs  # sum_j rho_j s_j and sum_j z_j rho_j s_j
    go = torch.empty((k + 3,) + total.shape, dtype=total.dtype, device=total.device)
    g_log_r = go[k + 2]
    torch.mul(mr, rs_sums[0], out=g_log_r)
    g_log_r.sub_(r * t.mul_(rho).sum(dim=0)).add_(rising_dlogr).mul_(r_free)
    if over is not None:  # capped means do not move with the centre or the spread
        keep = ~over
        rs_sums, rho_sums = ones_z @ (rs * keep), ones_z @ (rho * keep)
    else:
        rho_sums = ones_z @ rho  # sum_j rho_j (1 up to rounding) and sum_j z_j rho_j
    # d/dL_j summed over kernels, plain (row 0: the centre) and weighted by z_j (row 1)
    g_sums = torch.mul(rho_sums, m).sub_(rs_sums.mul_(mr))
    g_centre = g_sums[0]
    g_spread = g_sums[1].sub_(g_log_r * (2.0 * net.dz) / sd)
    _exp_(logw)
    torch.sub(rho, logw, out=go[:k])  # through log_softmax: rho_j - w_j
    go[k] = g_centre
    torch.mul(g_spread, spread, out=go[k + 1]).mul_(spread_free)
    g = go
    weights = wb[0::2]
    for i in range(len(weights) - 1, 0, -1):
        # ReLU's derivative as the sign of its output, in place: the activations are not
        # needed again, and this measured faster than threshold_backward.
        g = (weights[i].t() @ g).mul_(hidden[i - 1].sign_())
    g_x = weights[0].t() @ g
    return g_x, g_centre, g_spread * es


def poisson_limit(m: Tensor, b: Tensor, gamma: Tensor) -> Tensor:
    """``log Poisson(m; b / gamma)``: the bursty conditional's exact limit as ``b -> 0``."""
    mu = b / gamma
    return m * torch.log(mu) - mu - torch.lgamma(m + 1.0)


# Pairs per block: each block's temporaries ((K, pairs) kernel terms, (width, pairs)
# activations) stay within the CPU caches while per-op dispatch costs stay small;
# 16384 measured fastest of 2048 to 32768 at one thread (forward + backward).
_BLOCK = 16384


class PairwiseLogProb(torch.autograd.Function):
    """``log Phat(m | n)`` over 1-D pairs with a diagonal Jacobian computed up front.

    Each output depends only on its own pair's ``(b, beta, gamma)``, so the gradient of
    the *sum* is the vector of per-pair partial derivatives: the forward pass computes
    them and the backward pass is three multiplications. The pairs are shared among
    CPU worker threads (:mod:`pybivi.cme._parallel`). For a ReLU network the network and
    the mixture run on cache-sized blocks with their closed-form backward
    (:func:`heads_mixture_backward`), and the gradients they return go through the
    network inputs by their vector-Jacobian product
    (:meth:`~pybivi.cme.approximator.BurstyConditional._network_inputs_vjp`). Other
    networks run block by block under autograd. Double backward is not supported (nothing
    in pybivi needs it). ``tally`` (a list) receives each chunk's ``(pairs outside the
    domain, pairs with b < small_burst)``.
    """

    @staticmethod
    def forward(ctx, model, tally, n, m, b, beta, gamma):  # noqa: D102
        want = tuple(ctx.needs_input_grad[4:7])
        fused = any(want) and model.fused_relu
        compute = _fused_value_and_derivs if fused else _blockwise_value_and_derivs

        def chunk(n, m, b, beta, gamma):
            tally.append(model._count_outside(n, b, beta, gamma))  # list.append: thread-safe
            return compute(model, n, m, b, beta, gamma, want)

        out, derivs = map_chunks(chunk, (n, m, b, beta, gamma), _BLOCK)
        ctx.save_for_backward(*(d for d in derivs if d is not None))
        ctx.want = want
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        saved = iter(ctx.saved_tensors)
        grads = [grad_out * next(saved) if w else None for w in ctx.want]
        return (None, None, None, None, *grads)


def _blockwise_value_and_derivs(model, n, m, b, beta, gamma, want):
    """Values and per-pair derivatives block by block, each block under autograd."""
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
                d[sl] = 0.0 if g is None else g
    return out, derivs


def _fused_value_and_derivs(model, n, m, b, beta, gamma, want):
    """Values and per-pair derivatives with the closed-form network + mixture backward."""
    with torch.no_grad():
        feats, c, sigma, inputs_vjp = model._network_inputs_vjp(n, b, beta, gamma)
    x = feats.t()
    wb = model._mlp_weights()
    out = torch.empty_like(b)
    g_x = torch.empty_like(x)
    g_c, g_sigma = torch.empty_like(b), torch.empty_like(b)
    with torch.no_grad():
        for i in range(0, b.numel(), _BLOCK):
            sl = slice(i, i + _BLOCK)
            val, state = heads_mixture_forward(x[:, sl], c[sl], sigma[sl], m[sl], model.net, wb)
            out[sl] = val
            g_x[:, sl], g_c[sl], g_sigma[sl] = heads_mixture_backward(state)
        grads = inputs_vjp(g_x.t(), g_c, g_sigma)
    derivs = [g if w else None for g, w in zip(grads, want, strict=True)]
    small = b < model.small_burst
    if bool(small.any()):  # the exact small-burst limit replaces the network there
        out = torch.where(small, poisson_limit(m, b, gamma), out)
        mu = b / gamma
        slope = m / mu - 1.0  # d/dmu of m log mu - mu
        exact = (slope / gamma, torch.zeros_like(b), -slope * mu / gamma)
        derivs = [
            None if d is None else torch.where(small, e, d)
            for d, e in zip(derivs, exact, strict=True)
        ]
    return out, derivs
