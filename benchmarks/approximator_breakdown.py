"""Where the bursty approximator's time goes, and what its threading and exp2 buy.

Usage: ``python benchmarks/approximator_breakdown.py [--pairs 256000] [--repeats 7]``.
Prints, for the shipped approximator on the realistic pairs of
``approximator_speed.py``:

* one thread, section by section: domain tally, network inputs and moment match, MLP
  forward, mixture forward, mixture + MLP backward, the inputs' vector-Jacobian product;
* two threads: pybivi's shares of pairs (the default) against torch's own per-operation
  threading on all pairs at once (the same code with the sharing switched off);
* torch's float32 ``exp`` against ``exp2`` on a (kernels x pairs) array.
"""

from __future__ import annotations

import argparse
import time
import warnings

import docs_output
import numpy as np
import torch
from approximator_common import realistic_pairs, time_forward_backward

import pybivi.cme.mixture as mixture
from pybivi._allocator import tune_allocator
from pybivi.cme import load_default_approximator


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _timed_vjp(model, pairs: dict, g_x, g_c, g_s) -> float:
    """Seconds of one vector-Jacobian product of the network inputs (built untimed)."""
    n, b, beta, gamma = (pairs[k] for k in ("n", "b", "beta", "gamma"))
    vjp = model._network_inputs_vjp(n, b, beta, gamma)[3]
    t0 = time.perf_counter()
    vjp(g_x, g_c, g_s)
    return time.perf_counter() - t0


def sections(model, pairs: dict, repeats: int) -> dict[str, float]:
    """Best seconds of each section of one forward + backward, one thread, no sharing."""
    n, m, b, beta, gamma = (pairs[k] for k in ("n", "m", "b", "beta", "gamma"))
    block, wb = mixture._BLOCK, model._mlp_weights()
    with torch.no_grad():
        feats, c, sigma, _ = model._network_inputs_vjp(n, b, beta, gamma)
    x = feats.t()

    def mlp():
        for i in range(0, len(b), block):
            h = x[:, i : i + block]
            for j in range(len(wb) // 2):
                h = torch.addmm(wb[2 * j + 1], wb[2 * j], h)
                h = h.relu_() if j < len(wb) // 2 - 1 else h

    def forward():
        return [
            mixture.heads_mixture_forward(
                x[:, i : i + block],
                c[i : i + block],
                sigma[i : i + block],
                m[i : i + block],
                model.net,
                wb,
            )[1]
            for i in range(0, len(b), block)
        ]

    def backward():
        states = forward()
        t0 = time.perf_counter()
        grads = [mixture.heads_mixture_backward(s) for s in states]
        backward.seconds = time.perf_counter() - t0
        return grads

    def best_backward():
        out = []
        for _ in range(repeats):
            backward()
            out.append(backward.seconds)
        return min(out)

    with torch.no_grad():  # the closed-form passes run without recording (as in pybivi)
        grads = backward()
        g_x = torch.cat([g[0] for g in grads], dim=1).t()
        g_c, g_s = torch.cat([g[1] for g in grads]), torch.cat([g[2] for g in grads])
        return {
            "domain tally": _best(lambda: model._count_outside(n, b, beta, gamma), repeats),
            "network inputs + moment match": _best(
                lambda: model._network_inputs_vjp(n, b, beta, gamma), repeats
            ),
            "MLP forward": _best(mlp, repeats),
            "MLP + mixture forward": _best(forward, repeats),
            "mixture + MLP backward": best_backward(),
            "inputs' vector-Jacobian product": min(
                _timed_vjp(model, pairs, g_x, g_c, g_s) for _ in range(repeats)
            ),
        }


def threading_modes(model, pairs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward at two threads, sharing the pairs or not."""
    torch.set_num_threads(2)
    shared = mixture.map_chunks

    def unshared(fn, tensors, align):
        out, derivs = fn(*tensors)
        return out, list(derivs)

    out = {}
    try:
        for name, mapper in (("shares of pairs (default)", shared), ("torch per-op", unshared)):
            mixture.map_chunks = mapper
            time_forward_backward(model, pairs, 1)
            out[name] = float(np.median(time_forward_backward(model, pairs, repeats)))
    finally:
        mixture.map_chunks = shared
        torch.set_num_threads(1)
    return out


def exp_ratio(repeats: int) -> float:
    """How many times faster float32 ``exp2`` is than ``exp`` on a (14, 16384) array."""
    a = -10.0 * torch.rand(14, 16384)
    out = torch.empty_like(a)
    t_exp = _best(lambda: [torch.exp(a, out=out) for _ in range(20)], repeats)
    t_exp2 = _best(lambda: [torch.exp2(a, out=out) for _ in range(20)], repeats)
    return t_exp / t_exp2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=256_000)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(1)
    pairs = realistic_pairs(a.pairs, seed=7)
    model = load_default_approximator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(f"{a.pairs} pairs, one thread, best of {a.repeats} (ms):")
        for name, s in sections(model, pairs, a.repeats).items():
            print(f"  {name:<34}{1e3 * s:8.1f}")
        print("two threads, forward + backward, median (s):")
        for name, s in threading_modes(model, pairs, a.repeats).items():
            print(f"  {name:<34}{s:8.3f}")
    print(f"float32 exp2 is {exp_ratio(a.repeats):.1f}x faster than exp here")


if __name__ == "__main__":
    docs_output.run(main)
