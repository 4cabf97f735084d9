"""Speed of the bursty conditional: forward + backward for 256,000 (n, m) pairs on the CPU.

Usage: ``python benchmarks/approximator_speed.py [--pairs 256000] [--repeats 7] [--threads 2]
[--profile] [--default-allocator]``.
Prints the median and best time of pybivi's shipped approximator and of biVI's network
(when ../shared/reference/bivi-approximator-weights.zip is present), measured in the same
run on the same pairs.
"""

from __future__ import annotations

import argparse
import warnings

import docs_output
import numpy as np
import torch
from approximator_common import BIVI_WEIGHTS, realistic_pairs, time_forward_backward

from pybivi._allocator import tune_allocator
from pybivi.cme import load_approximator, load_bivi_approximator, load_default_approximator


def profile_once(model, pairs: dict[str, torch.Tensor], rows: int = 25) -> None:
    """Print the operators that dominate one forward + backward pass (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    time_forward_backward(model, pairs, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_forward_backward(model, pairs, 1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=256_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", nargs="*", default=[], help="other weights files to time")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler's top operators (self CPU time) for one pybivi pass",
    )
    ap.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's allocator settings alone (pybivi's training tunes them)",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not a.default_allocator:
        tune_allocator()  # as pybivi's training does (pybivi/_allocator.py); both backends gain
    pairs = realistic_pairs(a.pairs, seed=7)
    print(
        f"{a.pairs} pairs, torch threads {a.threads}; n: median {pairs['n'].median():.0f}, "
        f"99% {pairs['n'].quantile(0.99):.0f}; m: median {pairs['m'].median():.0f}, "
        f"99% {pairs['m'].quantile(0.99):.0f}"
    )
    models = {"pybivi": load_default_approximator()}
    for path in a.weights:
        models[path] = load_approximator(path)
    if BIVI_WEIGHTS.is_file():
        models["biVI"] = load_bivi_approximator(BIVI_WEIGHTS)
    rows = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in models.items():
            time_forward_backward(model, pairs, 1)  # warm-up
            reps = a.repeats if name == "pybivi" else max(2, a.repeats // 2)
            t = time_forward_backward(model, pairs, reps)
            rows[name] = (float(np.median(t)), float(np.min(t)))
        if a.profile:
            profile_once(models["pybivi"], pairs)
    width = max(10, *(len(k) + 2 for k in rows))
    print(f"{'backend':<{width}}{'median s':>10}{'best s':>10}")
    for name, (med, best) in rows.items():
        print(f"{name:<{width}}{med:>10.3f}{best:>10.3f}")
    if "biVI" in rows:
        print(
            f"speed-up (median): {rows['biVI'][0] / rows['pybivi'][0]:.1f}x, "
            f"(best): {rows['biVI'][1] / rows['pybivi'][1]:.1f}x"
        )


if __name__ == "__main__":
    docs_output.run(main)
