"""Time one training epoch of ContrastiveBiVI against scvi-tools' ContrastiveVI.

Both sides train on the same simulated cells (``pybivi.datasets.simulate_perturbseq``,
written once to an ``.h5ad`` cache): ContrastiveBiVI on nascent + mature counts with
the bursty scheme, scvi-tools 1.4.2 ``scvi.external.ContrastiveVI`` on the mature
counts, batch 128, 10 + 10 latents, every cell used for training. Each side runs in
its own subprocess so that its peak resident memory (``VmHWM``) is its own;
scvi-tools lives in a separate environment and is never a pybivi dependency::

    python3 -m venv .cache/bench-scvi
    .cache/bench-scvi/bin/pip install torch==2.13.0 scvi-tools==1.4.2

Run (defaults: 20,000 cells, 2,000 genes, 1 epoch)::

    .venv/bin/python benchmarks/train_speed.py [--cells N --genes G --epochs E]

Before and after a change to pybivi (without scvi-tools): unpack the earlier commit with
``git archive <commit> | tar -x -C /tmp/pybivi_base`` and run the script with
``--skip-scvi`` under ``PYTHONPATH=/tmp/pybivi_base`` and under ``PYTHONPATH=$PWD``,
alternately, a few times each.

The time of an epoch is the wall time of ``train(max_epochs=E)`` divided by ``E``
(data setup excluded, per-call overheads of both frameworks included); the process CPU
time is printed too, as it is steadier than wall time on a busy machine. On a
machine shared with other jobs, ``--threads 1`` avoids the collapse of multi-threaded
torch under oversubscription; both sides always get the same setting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import docs_output

ROOT = Path(__file__).resolve().parents[1]

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child would
# report the (large) peak of the parent that simulated the data.
PEAK = r"""
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
"""

OURS = PEAK + r"""
import json, sys, time
import anndata as ad
import torch
import torch._dynamo  # Adam's first step imports it (seconds); Lightning did so at import time
import pybivi
adata = ad.read_h5ad(sys.argv[1])
epochs, scheme, threads = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if threads > 0:
    torch.set_num_threads(threads)
pybivi.ContrastiveBiVI.setup_anndata(adata, perturbation_key="perturbation",
                                     control_labels=("NT",))
model = pybivi.ContrastiveBiVI(adata, n_background=10, n_salient=10, scheme=scheme)
start, cpu = time.perf_counter(), time.process_time()
model.train(max_epochs=epochs, batch_size=128, progress_bar=False, device="cpu")
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "threads": torch.get_num_threads(),
                  "peak_rss_mb": peak_rss_mb()}))
"""

THEIRS = PEAK + r"""
import json, sys, time, warnings, logging
warnings.filterwarnings("ignore")
import anndata as ad
import numpy as np
import torch
import scvi
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
adata = ad.read_h5ad(sys.argv[1])
epochs, threads = int(sys.argv[2]), int(sys.argv[3])
if threads > 0:
    torch.set_num_threads(threads)
mature = ad.AnnData(X=adata.layers["spliced"], obs=adata.obs[["perturbation"]].copy(),
                    var=adata.var[[]].copy())
scvi.settings.seed = 0
scvi.external.ContrastiveVI.setup_anndata(mature)
model = scvi.external.ContrastiveVI(mature, n_salient_latent=10, n_background_latent=10)
control = np.flatnonzero(mature.obs["perturbation"].to_numpy() == "NT")
target = np.flatnonzero(mature.obs["perturbation"].to_numpy() != "NT")
start, cpu = time.perf_counter(), time.process_time()
model.train(background_indices=control, target_indices=target, max_epochs=epochs,
            batch_size=128, train_size=1.0, accelerator="cpu", enable_progress_bar=False,
            early_stopping=False)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "threads": torch.get_num_threads(),
                  "version": scvi.__version__, "peak_rss_mb": peak_rss_mb()}))
"""


def _data(cells: int, genes: int, cache: Path) -> Path:
    path = cache / f"train_speed_{cells}x{genes}.h5ad"
    if not path.exists():
        from pybivi.datasets import simulate_perturbseq

        start = time.perf_counter()
        adata = simulate_perturbseq(n_cells=cells, n_genes=genes, seed=0)
        cache.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
        print(f"simulated {cells} x {genes} in {time.perf_counter() - start:.0f} s -> {path}")
    return path


def _run(python: str, code: str, args: list[str]) -> dict:
    out = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--scheme", default="bursty")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch threads on both sides (0: torch's default); 1 is steadier on a busy machine",
    )
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--scvi-python", default=str(ROOT / ".cache/bench-scvi/bin/python"))
    parser.add_argument("--skip-scvi", action="store_true")
    args = parser.parse_args()

    path = _data(args.cells, args.genes, args.cache)
    print(f"data: {args.cells} cells x {args.genes} genes, batch 128, {args.epochs} epoch(s)")
    ours = _run(sys.executable, OURS, [str(path), str(args.epochs), args.scheme, str(args.threads)])
    ours_epoch = ours["seconds"] / args.epochs
    print(f"pybivi ContrastiveBiVI ({args.scheme}, nascent + mature): {ours_epoch:.1f} s/epoch "
          f"(CPU {ours['cpu_seconds'] / args.epochs:.1f} s), "
          f"{args.cells / ours_epoch:.0f} cells/s, peak RSS {ours['peak_rss_mb']:.0f} MB, "
          f"{ours['threads']} threads")
    if args.skip_scvi:
        return
    if not Path(args.scvi_python).exists():
        sys.exit(f"no scvi-tools environment at {args.scvi_python}; see the module docstring")
    theirs = _run(args.scvi_python, THEIRS, [str(path), str(args.epochs), str(args.threads)])
    theirs_epoch = theirs["seconds"] / args.epochs
    print(f"scvi-tools {theirs['version']} ContrastiveVI (mature): {theirs_epoch:.1f} s/epoch "
          f"(CPU {theirs['cpu_seconds'] / args.epochs:.1f} s), "
          f"{args.cells / theirs_epoch:.0f} cells/s, peak RSS {theirs['peak_rss_mb']:.0f} MB, "
          f"{theirs['threads']} threads")
    ratio = ours_epoch / theirs_epoch
    print(f"ratio pybivi / scvi-tools (wall): {ratio:.2f}")
    # CPU time is steadier than wall time when other jobs share the machine.
    cpu_ratio = ours["cpu_seconds"] / theirs["cpu_seconds"]
    print(f"ratio pybivi / scvi-tools (CPU time): {cpu_ratio:.2f}")


if __name__ == "__main__":
    docs_output.run(main)
