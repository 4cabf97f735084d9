"""What block shuffling costs the fit: held-out ELBO with shuffled blocks vs single cells.

Counts read from disk are shuffled by blocks of contiguous rows (see
:class:`pybivi.data.CellData`): each minibatch then draws its cells from only
``load_blocks`` places of the file. This trains ContrastiveBiVI (bursty scheme) on an
in-memory simulated screen (``pybivi.datasets.simulate_perturbseq``) for the same
number of epochs with cells shuffled one by one and with shuffled blocks, and scores
the negative ELBO per cell of the same held-out cells (5 particles, fixed seed; lower is
better). Blocks are sized so that the cells loaded at a time are the same share of
the screen as pybivi's default (8 blocks of 2,048 rows) on screens of 100,000 and
1,000,000 cells. Two row orders are tried: as simulated (labels in random order, as in
droplet data) and sorted by perturbation (the worst case for blocks: a block holds one
or two perturbations).

Run (about 10 minutes on one core)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/block_shuffle.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import docs_output

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WINDOW = 2048 * 8  # cells loaded at a time with pybivi's defaults


def train_and_score(train, test, block_size, seed, epochs, load_blocks):
    """Held-out negative ELBO per cell after ``epochs`` epochs."""
    import pybivi

    pybivi.ContrastiveBiVI.setup_anndata(train)
    model = pybivi.ContrastiveBiVI(train, scheme="bursty", seed=seed)
    model.shuffle_block_size = block_size
    model._cells.load_blocks = load_blocks
    model.train(max_epochs=epochs, seed=seed, progress_bar=False, device="cpu")
    return model.elbo(test, n_particles=5, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=10_000, help="training cells")
    parser.add_argument("--test-cells", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--load-blocks", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from pybivi.datasets import simulate_perturbseq

    torch.set_num_threads(1)
    sim = simulate_perturbseq(n_cells=args.cells + args.test_cells, n_genes=args.genes, seed=0)
    rows = np.random.default_rng(0).permutation(sim.n_obs)
    test = sim[rows[: args.test_cells]].copy()
    train = sim[np.sort(rows[args.test_cells :])].copy()
    labels = train.obs["perturbation"].astype(str).to_numpy()
    test = test[test.obs["perturbation"].astype(str).isin(set(labels)).to_numpy()].copy()
    orders = {
        "as simulated": train,
        "sorted by label": train[np.argsort(labels, kind="stable")].copy(),
    }
    # Blocks giving the share of the screen loaded at a time that the default gives on
    # 100k and 1M cells.
    share = {f"like {n // 1000}k cells": DEFAULT_WINDOW / n for n in (100_000, 1_000_000)}
    blocks = {k: max(1, round(v * args.cells / args.load_blocks)) for k, v in share.items()}
    print(f"# {args.cells} training + {args.test_cells} held-out cells x {args.genes} genes, "
          f"{args.epochs} epochs, batch 128, load_blocks {args.load_blocks}; "
          f"held-out negative ELBO per cell (lower is better)", flush=True)
    print("| row order | shuffling | block size | seed | held-out -ELBO | minutes |")
    print("|---|---|---|---|---|---|")
    runs = [("any", "single cells", None)]
    runs += [(order, name, size) for order in orders for name, size in blocks.items()]
    results: dict[tuple[str, str], list[float]] = {}
    for order, name, size in runs:
        for seed in args.seeds:
            start = time.perf_counter()
            data = orders["as simulated"] if order == "any" else orders[order]
            loss = train_and_score(data, test, size, seed, args.epochs, args.load_blocks)
            results.setdefault((order, name), []).append(loss)
            minutes = (time.perf_counter() - start) / 60
            print(f"| {order} | {name} | {size or '-'} | {seed} | {loss:.3f} | {minutes:.1f} |",
                  flush=True)
    base = np.mean(results[("any", "single cells")])
    print("\n| row order | shuffling | mean held-out -ELBO | difference to single cells |")
    print("|---|---|---|---|")
    for (order, name), losses in results.items():
        print(f"| {order} | {name} | {np.mean(losses):.3f} | {np.mean(losses) - base:+.3f} |")


if __name__ == "__main__":
    docs_output.run(main)
