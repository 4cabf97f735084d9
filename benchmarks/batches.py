"""Batch correction of ContrastiveBiVI on a simulated screen with three batches.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batches.py [--cells 3000 --genes 800
        --epochs 40 --batches 3 --seed 0 --threads 1]

One screen is simulated twice with the same seed (:func:`pybivi.datasets.simulate_perturbseq`):
without batches, and with ``--batches`` batches whose effects are as strong as the cell-cycle
confounder. "As strong" is measured on the planted truth: per gene, the standard deviation
over cells of the planted log2 burst-size shift (cell cycle: by phase; batch: by batch), its
root mean square over genes. The batch effect's log2 standard deviation is set so that the
two are equal, and the same value is used for the batches' ``gamma/k`` shifts and capture
factors (so the batches are, if anything, stronger than the cell cycle).

ContrastiveBiVI is fitted three times (same seed and epochs): on the batched screen with
``batch_key="batch"``, on it without ``batch_key``, and on the batch-free screen. Printed
per fit, on the perturbed cells' salient posterior means: the entropy of batch mixing among
the 50 nearest neighbours as a fraction of its maximum ``log(n_batches)``
(:func:`pybivi.tl.metrics.mixing_entropy`), the program ARI
(:func:`pybivi.tl.metrics.program_ari`), and the same batch entropy in the background space.
"""

from __future__ import annotations

import argparse
import json
import time

import docs_output
import numpy as np
import torch

import pybivi
from pybivi import datasets, pp
from pybivi.datasets._batches_escapers import batch_design, resolve_batch_effect
from pybivi.tl import metrics


def cell_cycle_spread(raw) -> float:
    """RMS over genes of the per-gene s.d. over cells of the planted cell-cycle log2 b shift."""
    phase = raw.obs["phase"].astype(str).to_numpy()
    shift = np.zeros((raw.n_obs, raw.n_vars))
    shift[phase == "S"] = raw.var["cell_cycle_log2_S"].to_numpy()
    shift[phase == "G2M"] = raw.var["cell_cycle_log2_G2M"].to_numpy()
    return float(np.sqrt(np.mean(shift.std(axis=0) ** 2)))


def batch_spread(log2_b: np.ndarray, batch: np.ndarray) -> float:
    """The same spread for per batch and gene log2 b shifts ``log2_b`` of cells in ``batch``."""
    return float(np.sqrt(np.mean(log2_b[batch].std(axis=0) ** 2)))


def calibrated_effect(raw, n_batches: int, seed: int) -> tuple[float, float]:
    """The batch log2 s.d. matching the cell cycle's spread, and that spread."""
    n_draw = raw.n_obs + int(raw.obs["doublet"].sum())  # the simulator's drawn cells
    unit = batch_design(seed, n_draw, raw.n_vars, n_batches, resolve_batch_effect(1.0))
    target = cell_cycle_spread(raw)
    return target / batch_spread(unit["log2_burst_size"], unit["batch"]), target


def evaluate(model, adata, n_batches: int) -> dict[str, float]:
    perturbed = ~adata.obs["perturbation"].astype(str).eq("NT").to_numpy()
    out = {}
    for kind in ("salient", "background"):
        rep = model.get_latent_representation(kind=kind)[perturbed]
        if "batch" in adata.obs:
            batch = adata.obs["batch"].astype(str).to_numpy()[perturbed]
            out[f"batch_entropy_{kind}"] = metrics.mixing_entropy(rep, batch, k=50) / np.log(
                n_batches
            )
        if kind == "salient":
            programs = adata.obs["program"].astype(str).to_numpy()[perturbed]
            out["program_ari"] = metrics.program_ari(rep, programs)
    return out


def fit(adata, batch_key, epochs: int, seed: int):
    pybivi.ContrastiveBiVI.setup_anndata(adata, "perturbation", "NT", batch_key=batch_key)
    model = pybivi.ContrastiveBiVI(adata, seed=seed)
    start = time.perf_counter()
    model.train(max_epochs=epochs, progress_bar=False, device="cpu", seed=seed)
    return model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sim = dict(n_cells=args.cells, n_genes=args.genes, seed=args.seed)
    clean = datasets.simulate_perturbseq(**sim)
    effect, cc = calibrated_effect(clean, args.batches, args.seed)
    batched = datasets.simulate_perturbseq(**sim, n_batches=args.batches, batch_effect=effect)
    truth = batched.uns["simulation"]["batches"]
    batch_of = {c: j for j, c in enumerate(truth["categories"])}
    codes = batched.obs["batch"].map(batch_of).to_numpy()
    planted = batch_spread(truth["log2_burst_size"], codes)
    print(f"cell-cycle log2 b spread {cc:.3f}; batch effect s.d. {effect:.3f} "
          f"(planted batch log2 b spread {planted:.3f})")

    def prepared(raw):
        return pp.prepare(raw, "perturbation", "NT", program_key="program",
                          score_cell_cycle=False, n_top_genes=None)

    results = {}
    runs = (("with batch_key", prepared(batched), "batch"),
            ("without batch_key", prepared(batched), None),
            ("batch-free screen", prepared(clean), None))
    for name, adata, key in runs:
        model, seconds = fit(adata, key, args.epochs, args.seed)
        results[name] = {**evaluate(model, adata, args.batches), "fit_seconds": seconds}
        print(name, json.dumps({k: round(v, 3) for k, v in results[name].items()}))
    gap = results["batch-free screen"]["program_ari"] - results["with batch_key"]["program_ari"]
    print(f"ARI gap to the batch-free screen: {gap:.3f}")


if __name__ == "__main__":
    docs_output.run(main)
