"""End-to-end check on one NVIDIA GPU: training, posterior draws, kinetic calls (< 5 minutes).

Simulates a screen (``pybivi.datasets.simulate_perturbseq``, default 20,000 cells x 2,000
genes), trains ContrastiveBiVI (bursty scheme) with ``accelerator="gpu"`` for a few
epochs, draws the posterior of a subset of cells (``model.posterior``), runs
``pybivi.tl.de.kinetic`` and prints seconds per epoch, peak GPU memory
(``torch.cuda.max_memory_allocated``) and, when scvi-tools is importable, scvi-tools'
ContrastiveVI seconds per epoch on the same cells (mature counts). Run on a GPU machine::

    .venv/bin/python benchmarks/gpu_check.py [--cells 20000 --genes 2000 --epochs 3]

Without a GPU it exits with a message. The smoke mode runs the same steps on the CPU::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_check.py --device cpu --cells 2000 --genes 200
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import docs_output
import numpy as np
import torch


def _scvi_seconds_per_epoch(adata, epochs: int, accelerator: str) -> float:
    import anndata as ad
    import scvi

    mature = ad.AnnData(X=adata.layers["spliced"], obs=adata.obs[["perturbation"]].copy(),
                        var=adata.var[[]].copy())
    scvi.external.ContrastiveVI.setup_anndata(mature)
    model = scvi.external.ContrastiveVI(mature, n_salient_latent=10, n_background_latent=10)
    labels = mature.obs["perturbation"].to_numpy()
    start = time.perf_counter()
    model.train(background_indices=np.flatnonzero(labels == "NT"),
                target_indices=np.flatnonzero(labels != "NT"), max_epochs=epochs,
                batch_size=128, train_size=1.0, accelerator=accelerator,
                enable_progress_bar=False, early_stopping=False)
    return (time.perf_counter() - start) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    gpu = args.device == "gpu"
    if gpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU is available here; run it on a machine with an "
                 "NVIDIA GPU, or try the CPU smoke mode: --device cpu --cells 2000 --genes 200")

    import pybivi
    from pybivi.datasets import simulate_perturbseq

    start = time.perf_counter()
    adata = simulate_perturbseq(n_cells=args.cells, n_genes=args.genes, seed=0)
    print(f"simulated {args.cells} cells x {args.genes} genes in "
          f"{time.perf_counter() - start:.0f} s")
    pybivi.ContrastiveBiVI.setup_anndata(adata, perturbation_key="perturbation",
                                         control_labels=("NT",))
    model = pybivi.ContrastiveBiVI(adata, n_background=10, n_salient=10, scheme="bursty")
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, progress_bar=False,
                accelerator=args.device)
    per_epoch = (time.perf_counter() - start) / args.epochs
    print(f"training on {model.device}: {per_epoch:.2f} s/epoch "
          f"({args.cells / per_epoch:.0f} cells/s), final -ELBO/cell "
          f"{model.history['train_loss'].iloc[-1]:.2f}")

    start = time.perf_counter()
    cells = np.random.default_rng(0).choice(args.cells, size=min(args.cells, 2000), replace=False)
    idata = model.posterior(indices=np.sort(cells), n_samples=10)
    print(f"posterior: {dict(idata.posterior.sizes)} in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    calls = pybivi.tl.de.kinetic(model, groupby="program")
    print(f"de.kinetic: {len(calls)} rows in {time.perf_counter() - start:.1f} s")
    if gpu:
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory (torch.cuda.max_memory_allocated): {peak:.2f} GiB")
    if importlib.util.find_spec("scvi") is not None:
        theirs = _scvi_seconds_per_epoch(adata, args.epochs, args.device)
        print(f"scvi-tools ContrastiveVI: {theirs:.2f} s/epoch; ratio pybivi / scvi-tools "
              f"{per_epoch / theirs:.2f}")
    else:
        print("scvi-tools is not importable here: no ContrastiveVI comparison")


if __name__ == "__main__":
    docs_output.run(main)
