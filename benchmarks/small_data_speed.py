"""Where a bursty BiVI epoch spends its time on a small real data set, against SCVI.

Data: ``../shared/data/pancreas_739.h5ad`` prepared with ``pp.prepare(perturbation_key=None)``
and the ``--genes`` most variable genes. For pybivi's ``SCVI`` (mature counts, ZINB) and
``BiVI`` with the bursty scheme (nascent + mature counts, the neural approximator) this
times, in one process with one torch thread:

* the first one-epoch ``train`` call of a fresh model (loading the approximator and the
  other one-off costs included), then a further ``train(max_epochs=E)`` call (steady
  per-epoch cost), and the end-of-training domain check alone;
* a profile (``cProfile``) of the steady epochs, grouped into the approximator's
  ``P(m | n)`` (forward, with its per-pair derivatives), the autograd backward pass, the
  optimiser step, minibatch assembly and the rest of the model/guide evaluation.

Run (about a minute)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/small_data_speed.py [--genes 2000] [--epochs 5]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import warnings
from pathlib import Path

import docs_output
import torch

import pybivi
from pybivi import datasets, diagnostics, pp

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pancreas_739.h5ad"
GROUPS = {
    "approximator P(m|n)": ("mixture.py", "forward"),
    "autograd backward": ("__init__.py", "backward"),
    "optimiser step": ("adam.py", "adam"),
    "minibatch assembly": ("data.py", "iterate"),
    "model + guide (total)": ("trace_elbo.py", "differentiable_loss"),
}


def _group_times(profile: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profile).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
    out = {}
    for name, (file_end, func) in GROUPS.items():
        out[name] = sum(
            ct for (file, _, fn), (_, _, _, ct, _) in stats.items()
            if file.endswith(file_end) and fn == func
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    raw = datasets.read(DATA)
    adata = pp.prepare(raw, perturbation_key=None, score_cell_cycle=False,
                       n_top_genes=args.genes)
    print(f"{adata.n_obs} cells x {adata.n_vars} genes, batch 128, one torch thread")
    steady = {}
    for name, cls, kwargs in (("SCVI", pybivi.SCVI, {}),
                              ("BiVI bursty", pybivi.BiVI, {"scheme": "bursty"})):
        cls.setup_anndata(adata, perturbation_key=None)
        model = cls(adata, seed=0, **kwargs)
        start = time.perf_counter()
        model.train(max_epochs=1, progress_bar=False, seed=0)
        first = time.perf_counter() - start
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        model.train(max_epochs=args.epochs, progress_bar=False, seed=1)
        profile.disable()
        total = time.perf_counter() - start
        start = time.perf_counter()
        if diagnostics.applies(model):
            diagnostics.domain_table(model)
        check = time.perf_counter() - start
        steady[name] = total / args.epochs
        print(f"\n{name}: first train(1 epoch) call {first:.2f} s; then {steady[name]:.3f} s "
              f"per epoch over {args.epochs} (end-of-training domain check {check:.3f} s)")
        for group, seconds in _group_times(profile).items():
            print(f"  {group:24s} {seconds / args.epochs:7.3f} s/epoch "
                  f"({100 * seconds / total:4.1f}% under the profiler)")
    print(f"\nratio BiVI bursty / SCVI per steady epoch: "
          f"{steady['BiVI bursty'] / steady['SCVI']:.2f}")


if __name__ == "__main__":
    docs_output.run(main)
