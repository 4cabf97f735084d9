"""Data-parallel training on CPUs: 2 processes against 1, same epochs, held-out ELBO.

Both runs train ContrastiveBiVI (bursty scheme) on the same simulated screen
(``pybivi.datasets.simulate_perturbseq``, by default the demo's 3,000 cells x 800 genes)
with the same seed, batch size (cells per optimisation step over all processes),
epochs and validation split (``validation_fraction=0.1``, ``split_seed=0``). The held-out
negative ELBO per cell is ``model.elbo(indices=model.validation_indices)`` with 10
particles and a fixed seed; the relative difference of the two is the figure (aim:
within 1%). Wall seconds of each ``train`` call are printed too (process start-up of the
data-parallel run included). Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ddp_cpu.py [--cells 3000 --genes 800 --epochs 20]

``--strategy`` picks the Lightning strategy of the 2-process run (default
``ddp_notebook``: processes forked from this one; ``ddp_spawn`` starts fresh ones).
"""

from __future__ import annotations

import argparse
import time

import docs_output

import pybivi
from pybivi.datasets import simulate_perturbseq


def _train(adata, epochs: int, batch_size: int, devices: int, strategy: str):
    model = pybivi.ContrastiveBiVI(adata, n_background=10, n_salient=10, scheme="bursty")
    start = time.perf_counter()
    model.train(
        max_epochs=epochs, batch_size=batch_size, validation_fraction=0.1, split_seed=0,
        progress_bar=False, accelerator="cpu", devices=devices, strategy=strategy,
    )
    seconds = time.perf_counter() - start
    held_out = model.elbo(indices=model.validation_indices, n_particles=10, seed=0)
    return held_out, seconds, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--strategy", default="ddp_notebook")
    args = parser.parse_args()

    adata = simulate_perturbseq(n_cells=args.cells, n_genes=args.genes, seed=0)
    pybivi.ContrastiveBiVI.setup_anndata(adata, perturbation_key="perturbation",
                                         control_labels=("NT",))
    print(f"data: {args.cells} cells x {args.genes} genes, {args.epochs} epochs, "
          f"batch {args.batch_size}")
    one, one_s, _ = _train(adata, args.epochs, args.batch_size, 1, "auto")
    two, two_s, model = _train(adata, args.epochs, args.batch_size, 2, args.strategy)
    print(f"1 process:   held-out -ELBO/cell {one:.3f}  ({one_s:.0f} s)")
    print(f"2 processes: held-out -ELBO/cell {two:.3f}  ({two_s:.0f} s, {args.strategy})")
    diff = (two - one) / abs(one)
    print(f"relative difference (2 - 1) / |1|: {100 * diff:+.2f}%")
    last = model.history["train_loss"].iloc[-1]
    print(f"training -ELBO/cell at the last epoch, 2 processes: {last:.3f}")


if __name__ == "__main__":
    docs_output.run(main)
