"""Wall time and figure-2 metrics of `pybivi demo` (the README's main command).

Usage::

    .venv/bin/python benchmarks/bench_demo.py [--cells 3000 --genes 800 --epochs 60 --seeds 3]
        [--models ContrastiveBiVI,BiVI,SCVI,ContrastiveVI] [--out results/bench_demo]

Prints the time of each stage (simulation, preparation, each model's fit) and the
per-model ARI and entropy of mixing (mean +- s.d. over seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import docs_output
import torch

from pybivi import datasets, pp, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--models", default=",".join(report.MODEL_NAMES))
    parser.add_argument("--frequency-init", default="auto", choices=["auto", "random", "data"])
    parser.add_argument("--embedding", default="umap", choices=("umap", "pca"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default="results/bench_demo")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",")]
    print(f"torch threads for the fits: {torch.get_num_threads()}")
    start = time.perf_counter()
    raw = datasets.simulate_perturbseq(n_cells=args.cells, n_genes=args.genes, seed=0)
    t_sim = time.perf_counter() - start
    t0 = time.perf_counter()
    adata = pp.prepare(raw, "perturbation", "NT", program_key="program",
                       score_cell_cycle=False, n_top_genes=2000)
    kinds = raw.uns["simulation"]
    adata.uns["program_kinds"] = dict(zip(kinds["programs"], kinds["program_kinds"], strict=True))
    t_prep = time.perf_counter() - t0
    summary = report.run_pipeline(
        adata, Path(args.out), perturbation_key="perturbation", controls=["NT"],
        program_key="program", phase_key="phase", models=models, seeds=args.seeds,
        epochs=args.epochs, embedding=args.embedding, quiet=True,
        frequency_init=args.frequency_init,
    )
    total = time.perf_counter() - start
    print(f"data: {raw.n_obs} x {raw.n_vars} -> prepared {adata.n_obs} x {adata.n_vars}")
    print(f"simulate: {t_sim:.1f} s   prepare: {t_prep:.1f} s")
    for key, sec in summary["fit_seconds"].items():
        print(f"fit {key:28s} {sec:7.1f} s  ({sec / args.epochs:.2f} s/epoch)")
    print(f"total wall time: {total:.1f} s")
    for model, vals in summary.get("summary", {}).items():
        vals = {k: float("nan") if v is None else v for k, v in vals.items()}
        print(f"{model:16s} ARI {vals['ari_mean']:.3f} +- {vals['ari_std']:.3f}   "
              f"entropy {vals['mixing_entropy_mean']:.3f} +- {vals['mixing_entropy_std']:.3f}")
    if "program_purity" in summary:
        print("program purity (mean over seeds):")
        print(json.dumps(summary["program_purity"], indent=1))
    if "kinetic_recovery" in summary:
        print("kinetic recovery:", json.dumps(summary["kinetic_recovery"]))


if __name__ == "__main__":
    docs_output.run(main)
