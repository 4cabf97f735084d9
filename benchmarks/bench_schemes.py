"""Speed and accuracy of the reaction schemes' exact samplers and exact bursty backend.

Run: ``.venv/bin/python benchmarks/bench_schemes.py [--pairs 1000000]``

Prints
* exact bursty sampler throughput (cell-gene pairs per second) on log-uniform
  parameters covering the simulator's range, with the relative error of the sample
  means/variances/covariance against the closed-form moments;
* the exact bursty backend: seconds per distinct parameter set and its agreement
  (KL, Hellinger) with the nascent NB marginal it must reproduce;
* forward + backward time of ``BivariateCME(...).log_prob`` for a 128 x 2,000
  minibatch under the closed-form schemes.
"""

from __future__ import annotations

import argparse
import time

import docs_output
import numpy as np
import torch

from pybivi import schemes
from pybivi.distributions import BivariateCME
from pybivi.schemes import sample_bursty


def log_uniform(low: float, high: float, size: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(size, dtype=torch.float64, generator=gen)
    return torch.exp(np.log(low) + u * (np.log(high) - np.log(low)))


def bench_sampler(pairs: int) -> None:
    gen = torch.Generator().manual_seed(0)
    b = log_uniform(0.05, 50.0, pairs, gen)
    beta = log_uniform(0.3, 5.0, pairs, gen)
    gamma = log_uniform(0.1, 5.0, pairs, gen)
    start = time.perf_counter()
    sample_bursty(b, beta, gamma, generator=gen)
    elapsed = time.perf_counter() - start
    print(f"sampler: {pairs:,} pairs (b 0.05-50, beta 0.3-5, gamma 0.1-5, log-uniform)")
    print(f"  {elapsed:.2f} s, {pairs / elapsed:,.0f} pairs/s")
    # Moments: one parameter set, many draws, against the closed forms (SPEC section 4).
    for bb, be, ga in [(0.14, 1.0, 0.5), (5.0, 2.0, 1.0), (50.0, 0.3, 5.0)]:
        n = 400_000
        x = sample_bursty(torch.full((n,), bb), torch.tensor(be), torch.tensor(ga), gen)
        mean = np.array([bb / be, bb / ga])
        var = mean * np.array([1 + bb, 1 + bb * be / (be + ga)])
        cov = bb * bb / (be + ga)
        emp_cov = float(torch.cov(x.T)[0, 1])
        err_mean = np.abs(x.mean(0).numpy() / mean - 1).max()
        err_var = np.abs(x.var(0).numpy() / var - 1).max()
        print(
            f"  b={bb:g} beta={be:g} gamma={ga:g}: max rel err mean {err_mean:.4f}, "
            f"var {err_var:.4f}, cov {abs(emp_cov / cov - 1):.4f} ({n:,} draws)"
        )


def bench_exact_backend() -> None:
    scheme = schemes.get("bursty", backend="exact")
    print("exact bursty backend (one solver call per distinct parameter set):")
    for bb, be, ga in [(0.5, 1.0, 0.5), (5.0, 2.0, 1.0), (30.0, 0.5, 0.2)]:
        mu = [t.double() for t in scheme.from_kinetic_params(bb, be, ga)]
        n_max = int(mu[0] + 12 * np.sqrt(float(mu[0]) * (1 + bb)))
        m_max = int(mu[1] + 12 * np.sqrt(float(mu[1]) * (1 + bb)))
        n, m = torch.meshgrid(torch.arange(n_max + 1.0), torch.arange(m_max + 1.0), indexing="ij")
        start = time.perf_counter()
        logp = scheme.log_prob(n.double(), m.double(), *mu)
        elapsed = time.perf_counter() - start
        p = logp.exp().numpy()
        nb = torch.distributions.NegativeBinomial(
            torch.tensor(1 / be, dtype=torch.float64), probs=torch.tensor(bb / (1 + bb)).double()
        )
        q = nb.log_prob(torch.arange(n_max + 1.0).double()).exp().numpy()
        marg = p.sum(1)
        hell = np.sqrt(0.5 * ((np.sqrt(marg) - np.sqrt(q)) ** 2).sum())
        print(
            f"  b={bb:g} beta={be:g} gamma={ga:g}: grid {n_max + 1}x{m_max + 1}, {elapsed:.3f} s, "
            f"mass {p.sum():.8f}, Hellinger(nascent marginal, NB) {hell:.2e}"
        )


def bench_log_prob() -> None:
    gen = torch.Generator().manual_seed(1)
    cells, genes = 128, 2000
    mu_n = (torch.rand(cells, genes, generator=gen) * 5 + 0.01).requires_grad_()
    mu_m = (torch.rand(cells, genes, generator=gen) * 5 + 0.01).requires_grad_()
    theta = (torch.rand(genes, generator=gen) * 3 + 0.1).requires_grad_()
    x = torch.poisson(torch.stack([mu_n, mu_m], -1).detach(), generator=gen)
    print(f"BivariateCME log_prob forward+backward, {cells} x {genes}, float32:")
    for name in ("constitutive", "extrinsic"):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            lp = BivariateCME(mu_n, mu_m, theta, scheme=name, validate_args=False).log_prob(x)
            lp.sum().backward()
            times.append(time.perf_counter() - start)
        print(f"  {name}: median {1000 * np.median(times):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_sampler(args.pairs)
    bench_exact_backend()
    bench_log_prob()


if __name__ == "__main__":
    docs_output.run(main)
