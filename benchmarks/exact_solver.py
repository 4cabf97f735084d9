"""Speed and accuracy of the exact bursty CME solver over a spread of parameters.

Run: ``.venv/bin/python benchmarks/exact_solver.py [--quick] [--threads 1]``

Prints one row per parameter set: the returned grid (default crop, mass beyond it at
most 1e-12 per species), the number of quadrature nodes, wall seconds per PMF (best of
``--repeat``), ``1 - total mass``, the max abs error of the nascent marginal against
the exact NB(1/beta, mean b/beta), and the worst relative error of the five analytic
moments on the default crop (covariance on the correlation scale; the truncation at
1e-12 mass dominates it where means are tiny). Wall and CPU seconds are both shown:
on a shared machine wall time includes waiting for a core. Then the throughput of
:func:`pybivi.cme.exact_pmf_many` on a log-uniform random design over the whole domain
(log10 b in [-3, 3], log10 beta in [-2, 2], log10 gamma in [-3, 2]) with the state
space capped per species, as an approximator's training-data generator would use it,
and the worst generating-function error of the default quadrature rule against a rule
with ~4x the nodes over random parameter sets of the whole domain.
"""

from __future__ import annotations

import argparse
import time

import docs_output
import numpy as np
import torch
from scipy import stats

from pybivi.cme import analytic_moments, exact_pmf, exact_pmf_many, suggest_grid
from pybivi.cme.quadrature import log_gf, quadrature_rule, unit_circle_minus_one

POINTS = [
    (1e-3, 1e-2, 1e-3),
    (1e-3, 100.0, 100.0),
    (0.01, 1.0, 1.0),
    (0.5, 100.0, 1e-3),
    (1.0, 1.0, 1.0),
    (2.0, 50.0, 0.5),
    (2.0, 0.5, 50.0),
    (3.0, 1e-2, 100.0),
    (5.0, 0.05, 0.2),
    (20.0, 2.0, 0.2),
    (30.0, 1.0, 0.05),
    (100.0, 5.0, 3.0),
]


def _errors(pmf: np.ndarray, b: float, beta: float, gamma: float) -> tuple[float, float, float]:
    n = np.arange(pmf.shape[0], dtype=np.float64)
    m = np.arange(pmf.shape[1], dtype=np.float64)
    pn, pm = pmf.sum(axis=1), pmf.sum(axis=0)
    nb_err = float(np.abs(pn - stats.nbinom.pmf(n, 1 / beta, 1 / (1 + b))).max())
    mean_ref, cov_ref = analytic_moments("bursty", b=b, beta=beta, gamma=gamma)
    en, em = n @ pn, m @ pm
    dn, dm = n - en, m - em
    got = [en, em, dn**2 @ pn, dm**2 @ pm, dn @ pmf @ dm]
    ref = [mean_ref[0], mean_ref[1], cov_ref[0, 0], cov_ref[1, 1], cov_ref[0, 1]]
    scale = [abs(r) for r in ref[:4]] + [np.sqrt(cov_ref[0, 0] * cov_ref[1, 1])]
    mom_err = max(abs(g - r) / s for g, r, s in zip(got, ref, scale, strict=True))
    return 1.0 - float(pmf.sum()), nb_err, float(mom_err)


def table(points: list[tuple[float, float, float]], repeat: int) -> None:
    print(f"{'b':>8} {'beta':>8} {'gamma':>8} {'grid':>12} {'nodes':>6} {'wall s':>9} "
          f"{'cpu s':>9} {'1-mass':>9} {'NB err':>9} {'mom err':>9}")
    for b, beta, gamma in points:
        best, best_cpu = np.inf, np.inf
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            pmf = exact_pmf("bursty", b=b, beta=beta, gamma=gamma)
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        nodes = quadrature_rule(b, beta, gamma)[0].size
        lack, nb_err, mom_err = _errors(pmf, b, beta, gamma)
        grid = f"{pmf.shape[0]}x{pmf.shape[1]}"
        print(f"{b:8.3g} {beta:8.3g} {gamma:8.3g} {grid:>12} {nodes:6d} {best:9.4f} "
              f"{best_cpu:9.4f} {lack:9.1e} {nb_err:9.1e} {mom_err:9.1e}")


def throughput(n_sets: int, cap: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    logs = rng.uniform([-3, -2, -3], [3, 2, 2], size=(n_sets, 3))
    sets = [dict(zip(("b", "beta", "gamma"), 10.0**row, strict=True)) for row in logs]
    t0, c0 = time.perf_counter(), time.process_time()
    out = exact_pmf_many("bursty", sets, max_per_species=cap)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    done = [p for p in out if p is not None]
    sizes = [p.size for p in done]
    print(
        f"\nexact_pmf_many: {len(sets)} random sets, cap {cap} per species: "
        f"{len(done)} computed, {len(sets) - len(done)} skipped, {elapsed:.2f} s wall "
        f"({cpu:.2f} s cpu) total, "
        f"{elapsed / max(1, len(done)):.3f} s per computed PMF "
        f"(median grid {int(np.median(sizes))} states, max {max(sizes)})"
    )
    errs = [
        _errors(p, s["b"], s["beta"], s["gamma"])
        for s, p in zip(sets, out, strict=True)
        if p is not None
    ]
    print(
        f"over the computed sets: max 1-mass {max(e[0] for e in errs):.1e}, "
        f"max NB marginal err {max(e[1] for e in errs):.1e}"
    )
    skipped = [s for s, p in zip(sets, out, strict=True) if p is None]
    if skipped:
        worst = max(skipped, key=lambda s: max(suggest_grid("bursty", **s)))
        print(f"largest skipped suggest_grid: {suggest_grid('bursty', **worst)}")


def rule_accuracy(n_points: int, seed: int = 1) -> None:
    """Worst ``|G - G_ref|`` of the default rule against a ~4x refined one, whole domain."""
    rng = np.random.default_rng(seed)
    u = unit_circle_minus_one(4096)[rng.integers(0, 4096, 48)]
    v = np.concatenate([u, np.conj(u)])  # both signs of Im v: the near-pole case
    worst, where, nodes = 0.0, None, []
    for logs in rng.uniform([-3, -2, -3], [3, 2, 2], size=(n_points, 3)):
        b, beta, gamma = 10.0**logs
        val = np.exp(log_gf(u, v, b, beta, gamma))
        fine = quadrature_rule(b, beta, gamma, step=0.3, panel_nodes=24, head_nodes=30)
        ref = np.exp(log_gf(u, v, b, beta, gamma, *fine))
        err = float(np.abs(val - ref).max())
        nodes.append(quadrature_rule(b, beta, gamma)[0].size)
        if err > worst:
            worst, where = err, (b, beta, gamma)
    print(
        f"\nrule vs ~4x refined rule, {n_points} random sets x {u.size * v.size} torus points: "
        f"max |dG| {worst:.1e} at b={where[0]:.3g}, beta={where[1]:.3g}, gamma={where[2]:.3g}; "
        f"nodes median {int(np.median(nodes))}, max {max(nodes)}"
    )


def compare_training_data(points: list[tuple[float, float, float]]) -> None:
    """Agreement and speed against the approximator's own solver, on its grids."""
    from pybivi.cme.training_data import bursty_joint, grid_size

    print("\nvs pybivi.cme.training_data.bursty_joint (its FFT grid, ours cropped to it):")
    for b, beta, gamma in points:
        shape = grid_size(b, beta, gamma)
        t0 = time.perf_counter()
        theirs = bursty_joint(b, beta, gamma)
        t1 = time.perf_counter()
        kw = {"b": b, "beta": beta, "gamma": gamma}
        ours = exact_pmf("bursty", n_max=shape[0] - 1, m_max=shape[1] - 1, **kw)
        t2 = time.perf_counter()
        print(
            f"  b={b:g} beta={beta:g} gamma={gamma:g} grid {shape}: max |diff| "
            f"{np.abs(theirs - ours).max():.1e}, wall s theirs {t1 - t0:.2f} ours {t2 - t1:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the b = 100 point")
    parser.add_argument("--repeat", type=int, default=1, help="timing repeats (best of)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (numpy unaffected)")
    parser.add_argument("--sets", type=int, default=60, help="random sets for exact_pmf_many")
    parser.add_argument("--cap", type=int, default=1000, help="max states per species")
    parser.add_argument("--rule-points", type=int, default=40, help="sets for the rule check")
    parser.add_argument(
        "--compare-training-data", action="store_true", help="also time the approximator's solver"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    points = [p for p in POINTS if not (args.quick and p[0] >= 100)]
    table(points, args.repeat)
    throughput(args.sets, args.cap)
    rule_accuracy(args.rule_points)
    if args.compare_training_data:
        compare_training_data([(30.0, 2.0, 1.0), (60.0, 20.0, 10.0), (50.0, 1.0, 0.3)])


if __name__ == "__main__":
    docs_output.run(main)
