"""Train ContrastiveBiVI on screens that stay on disk: peak memory and speed by size.

For each size in ``--sizes`` a screen of that many cells x ``--genes`` genes is built by
tiling a smaller simulation (``pybivi.datasets.simulate_perturbseq``, ``--base-cells``
cells) and written chunk by chunk (never all cells in memory) to an ``.h5ad`` file and a
zarr store in ``--workdir`` (deleted afterwards unless ``--keep``); with ``--reuse``, stores
of that name already in ``--workdir`` (``screen_<cells>.h5ad``, ``screen_<cells>.zarr``,
e.g. kept by an earlier ``--keep`` run, or links to them) are used as they are and never
deleted. Each store is then opened with :func:`pybivi.storage.open_lazy` (or, with
``--reader read_lazy``, ``anndata.experimental.read_lazy``) in a fresh subprocess, set
up, and trained for one epoch (or ``--max-steps`` minibatches of 128 cells) with block-shuffled
minibatches; the subprocess reports its peak resident memory (``VmHWM``) and the seconds
per trained cell. The same loop on the smallest size loaded fully in memory (cells
shuffled one by one) gives the in-memory speed to compare with (``--no-memory`` leaves it
out, e.g. when the smallest size is a million cells).

Training is ``model.train`` (Lightning), one epoch or its first ``--max-steps`` steps (a
callback stops it), so that a partial epoch can be timed; the time includes the domain check
that ends every training run (at most 20,000 cells). Capture efficiency defaults
to 0.02, which gives droplet-like sparsity (about 22% of mature and 9% of nascent
entries non-zero at 2,000 genes) and keeps 1M cells at about 5 GB per store.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py --sizes 100000 300000 \
        --max-steps 200 --workdir /tmp/pybivi-scale

``--threads`` sets torch's threads in each run (default 1, for a shared machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import docs_output

ROOT = Path(__file__).resolve().parents[1]
CHUNK_CELLS = 20_000
LAYERS = ("unspliced", "spliced")


def existing_stores(n_cells: int, genes: int, workdir: Path, formats) -> dict[str, Path] | None:
    """The stores of ``n_cells`` cells already in ``workdir``, or None if any is missing.

    Raises ``ValueError`` when a store is there but holds another shape (it is left as it
    is rather than overwritten).
    """
    import h5py
    import zarr

    paths = {fmt: workdir / f"screen_{n_cells}.{fmt}" for fmt in ("h5ad", "zarr")}
    if not all(paths[fmt].exists() for fmt in formats):
        return None
    for fmt in formats:
        if fmt == "h5ad":
            with h5py.File(paths[fmt], "r") as root:
                shapes = [tuple(root["layers"][layer].attrs["shape"]) for layer in LAYERS]
        else:
            root = zarr.open_group(paths[fmt], mode="r")
            shapes = [tuple(root["layers"][layer].attrs["shape"]) for layer in LAYERS]
        if any(shape != (n_cells, genes) for shape in shapes):
            raise ValueError(f"{paths[fmt]} holds layers of shape {shapes}, not "
                             f"({n_cells}, {genes}); move it or leave out --reuse")
    return paths


def build_stores(n_cells: int, base, workdir: Path) -> dict[str, Path]:
    """Write ``n_cells`` tiled from ``base`` to an h5ad file and a zarr store, by chunks."""
    import h5py
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    import zarr
    from anndata.io import sparse_dataset, write_elem

    n_base = base.n_obs
    labels = base.obs["perturbation"].astype(str).to_numpy()
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(labels[np.arange(n_cells) % n_base])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=base.var_names.astype(str))
    counts = {layer: sp.csr_matrix(base.layers[layer]).astype(np.float32) for layer in LAYERS}
    paths = {fmt: workdir / f"screen_{n_cells}.{fmt}" for fmt in ("h5ad", "zarr")}
    roots = {
        "h5ad": h5py.File(paths["h5ad"], "w"),
        "zarr": zarr.open_group(paths["zarr"], mode="w"),
    }
    for root in roots.values():
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(root, "obs", obs)
        write_elem(root, "var", var)
        write_elem(root, "uns", {})
        write_elem(root, "layers", {})
    for start in range(0, n_cells, CHUNK_CELLS):
        rows = np.arange(start, min(start + CHUNK_CELLS, n_cells)) % n_base
        for layer in LAYERS:
            chunk = counts[layer][rows]
            for root in roots.values():
                if start == 0:
                    kwargs = {"chunks": (1_000_000,)}
                    write_elem(root["layers"], layer, chunk, dataset_kwargs=kwargs)
                else:
                    sparse_dataset(root["layers"][layer]).append(chunk)
    roots["h5ad"].close()
    return paths


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec.
RUN = r"""
import itertools, json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[4]))
import torch._dynamo  # Adam's first step imports it: keep it out of the timing
import anndata as ad
import pybivi
from lightning.pytorch.callbacks import Callback
from pybivi import storage

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

path, reader, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
if reader == "memory":
    adata = ad.read_h5ad(path)
elif reader == "read_lazy":  # anndata's own lazy reader (dask arrays, lazy obs)
    adata = ad.experimental.read_lazy(path)
else:
    adata = storage.open_lazy(path)
pybivi.ContrastiveBiVI.setup_anndata(adata)
setup_s = time.perf_counter() - start
model = pybivi.ContrastiveBiVI(adata, scheme="bursty", seed=0)
cells = model._cells
n_batches = (adata.n_obs - 1) // 128 + 1
steps = n_batches if max_steps <= 0 else min(max_steps, n_batches)
rng = np.random.default_rng(0)
start = time.perf_counter()  # reading alone: the same minibatches, no training
for _ in itertools.islice(cells.iterate(None, 128, shuffle=True, rng=rng), steps):
    pass
read_s = time.perf_counter() - start
class StopAfter(Callback):
    # Ends the epoch after `steps` optimiser steps (a partial epoch when asked).
    def __init__(self, steps):
        self.steps = steps
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True
start = time.perf_counter()
model.train(max_epochs=1, batch_size=128, progress_bar=False, device="cpu", kl_warmup_epochs=1,
            callbacks=[StopAfter(steps)] if steps < n_batches else None)
train_s = time.perf_counter() - start
print(json.dumps({"cells": adata.n_obs, "reader": reader, "block_size": cells.block_size,
                  "steps": steps, "setup_s": setup_s, "train_s": train_s,
                  "us_per_cell": 1e6 * train_s / (steps * 128),
                  "read_us_per_cell": 1e6 * read_s / (steps * 128), "peak_mb": peak_mb()}))
"""


def run_one(path: Path, reader: str, max_steps: int, threads: int) -> dict:
    """Train in a fresh subprocess; its JSON report."""
    cmd = [sys.executable, "-c", RUN, str(path), reader, str(max_steps), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"run failed ({path}, {reader}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_gb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--base-cells", type=int, default=5000)
    parser.add_argument("--capture", type=float, default=0.02)
    parser.add_argument("--max-steps", type=int, default=0, help="0: a full epoch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pybivi-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the written stores")
    parser.add_argument("--reuse", action="store_true",
                        help="use the stores of each size already in --workdir (and keep "
                        "them); write only the missing ones")
    parser.add_argument("--formats", nargs="+", default=["h5ad", "zarr"])
    parser.add_argument("--no-memory", action="store_true",
                        help="leave out the in-memory run on the smallest size")
    parser.add_argument("--reader", default="lazy", choices=["lazy", "read_lazy"],
                        help="lazy: pybivi.storage.open_lazy; read_lazy: "
                        "anndata.experimental.read_lazy (needs dask)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from pybivi.datasets import simulate_perturbseq

    args.workdir.mkdir(parents=True, exist_ok=True)
    steps = "a full epoch" if args.max_steps <= 0 else f"at most {args.max_steps} steps"
    print(f"# ContrastiveBiVI (bursty), batch 128, {steps}, {args.threads} torch thread(s); "
          f"{args.genes} genes tiled from {args.base_cells} simulated cells "
          f"(capture {args.capture})", flush=True)
    base = None  # simulated when a store has to be written
    rows = []
    for i, n_cells in enumerate(sorted(args.sizes)):
        start = time.perf_counter()
        paths = None
        if args.reuse:
            paths = existing_stores(n_cells, args.genes, args.workdir, args.formats)
        reused = paths is not None
        if not reused:
            if base is None:
                base = simulate_perturbseq(n_cells=args.base_cells, n_genes=args.genes, seed=0,
                                           capture_median=args.capture)
            paths = build_stores(n_cells, base, args.workdir)
        print(f"{'reused' if reused else 'wrote'} {n_cells} cells"
              + ("" if reused else f" in {time.perf_counter() - start:.0f} s") + ": "
              + ", ".join(f"{fmt} {disk_gb(paths[fmt]):.2f} GB" for fmt in args.formats),
              flush=True)
        runs = [(fmt, args.reader) for fmt in args.formats]
        runs += [("h5ad", "memory")] if i == 0 and not args.no_memory else []
        for fmt, reader in runs:
            row = {"format": fmt, **run_one(paths[fmt], reader, args.max_steps, args.threads)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.keep and not reused:
            for path in paths.values():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    print("\n| cells | store | reader | steps | setup s | read us/cell | train us/cell | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cells']:,} | {r['format']} | {r['reader']} | {r['steps']} | "
              f"{r['setup_s']:.1f} | {r['read_us_per_cell']:.1f} | {r['us_per_cell']:.0f} | "
              f"{r['peak_mb']:.0f} |")


if __name__ == "__main__":
    docs_output.run(main)
