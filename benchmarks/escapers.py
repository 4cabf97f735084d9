"""Cells that escape their perturbation: detection, program ARI and kinetic calls.

Simulates the demo screen (``pybivi demo``'s data: 3,000 cells x 800 genes, seed 0) twice,
with ``escape_fraction=0.3`` (30% of the cells of every targeting perturbation carry the
guide and show no effect) and without escapers, prepares both as ``benchmarks/bench_demo.py``
does (doublets and unassigned cells dropped), and fits ContrastiveBiVI with the paper's
prior (``salient_prior="normal"``) and with the escaper mixture (``"mixture"``) on each.
Fits are cached under ``.cache/escapers/`` (git-ignored; ``--refit`` redoes them). Per fit
it prints:

* ``auroc``: escaper detection among the perturbed cells, responders against escapers.
  Mixture: :meth:`get_perturbation_probability`. Normal prior (no such option): the same
  Bayes rule applied after the fit to its posterior-mean ``t`` and its label means at
  ``w = 0.5``, ``mu_c . t - |mu_c|^2 / 2`` (the best the paper's model offers);
* ``ari``: :func:`pybivi.tl.metrics.program_ari` of the salient posterior means of the true
  responders against their programs;
* per program, the precision and recall of :func:`pybivi.tl.de.kinetic`'s calls (burst size
  or ``gamma/k``; :func:`pybivi.datasets.truth_scores`, ``strength="mean"``), with the
  defaults: the mixture model tests its responders (probability > 0.5), the normal one every
  cell. ``normal+oracle`` tests the normal fit on the true responders, ``mixture+soft``
  the mixture fit with its probabilities as weights, ``mixture+top_share`` with the share
  ``w_c`` of each label's cells of highest probability as responders;
* ``share_undecided`` (mixture): the share of perturbed cells with a probability in
  (0.1, 0.9); ``called_escapers``: the share at or below 0.5;
* ``s_per_epoch`` and ``cpu_s_per_epoch``: training wall and process CPU seconds per
  epoch (CPU time is the steadier on a shared machine).

Usage (one torch thread; four fits of a few minutes each, later runs reuse them)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/escapers.py [--epochs 60] [--escape 0.3]
        [--cells 3000 --genes 800] [--refit]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import docs_output
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]


def prepared_data(cells: int, genes: int, escape: float, seed: int = 0):
    """The demo's simulation with ``escape`` escapers, prepared as ``pybivi demo`` does."""
    from pybivi import datasets, pp

    raw = datasets.simulate_perturbseq(
        n_cells=cells, n_genes=genes, seed=seed, escape_fraction=escape
    )
    adata = pp.prepare(
        raw, "perturbation", "NT", program_key="program", score_cell_cycle=False,
        n_top_genes=2000,
    )  # fmt: skip
    if "responder" not in adata.obs:  # no escapers: every perturbed cell responds
        adata.obs["responder"] = (adata.obs["perturbation"] != "NT").to_numpy()
    return adata


def fit_or_load(adata, prior: str, tag: str, args: argparse.Namespace):
    """ContrastiveBiVI with ``salient_prior=prior`` (cached) and its seconds per epoch."""
    from pybivi.models import ContrastiveBiVI

    name = f"{tag}_{prior}_c{args.cells}_g{args.genes}_e{args.epochs}"
    path = ROOT / ".cache" / "escapers" / name
    ContrastiveBiVI.setup_anndata(adata, perturbation_key="perturbation", control_labels="NT")
    if path.exists() and not args.refit:
        model = ContrastiveBiVI.load(path, adata)
        return model, json.loads((path / "timing.json").read_text())
    model = ContrastiveBiVI(adata, salient_prior=prior, seed=0)
    start, cpu = time.perf_counter(), time.process_time()
    model.train(max_epochs=args.epochs, progress_bar=False, device="cpu", seed=0)
    timing = {
        "s_per_epoch": (time.perf_counter() - start) / args.epochs,
        # CPU time is steadier than wall time on a machine shared with other jobs.
        "cpu_s_per_epoch": (time.process_time() - cpu) / args.epochs,
    }
    model.save(path, overwrite=True)
    (path / "timing.json").write_text(json.dumps(timing))
    return model, timing


def detection_scores(model, prior: str) -> np.ndarray:
    """Responder scores: the mixture's probabilities, or the post-hoc rule for "normal"."""
    if prior == "mixture":
        return model.get_perturbation_probability(n_samples=25)
    t = model.get_latent_representation(kind="salient").astype(np.float64)
    label = model.make_batches(batch_size=model.registry.n_cells)
    label = next(label)["label"].clamp(min=0).cpu().numpy()
    means = model.module.salient_means.detach().double().cpu().numpy()[label]
    return np.sum(t * means, 1) - 0.5 * np.sum(means * means, 1)


def kinetic_scores(model, adata, responders=None, weights=None) -> pd.DataFrame:
    """Per program: precision and recall of the kinetic calls (either parameter)."""
    from pybivi import datasets
    from pybivi.tl import de

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        table = de.kinetic(model, groupby="program", reference="control",
                           responders=responders, weights=weights)  # fmt: skip
    scores = datasets.truth_scores(table, adata, strength="mean")
    return scores[scores["target"] == "any"].set_index("program")[["precision", "recall"]]


def top_share_responders(model, adata) -> np.ndarray:
    """Per label, the learned share ``w_c`` of its cells with the highest probabilities."""
    prob = model.get_perturbation_probability()
    share = torch.sigmoid(model.module.responder_logits).detach().cpu().numpy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    keep = np.ones(adata.n_obs, dtype=bool)
    for k, label in enumerate(model.registry.labels):
        if label in model.registry.control_labels:
            continue
        cells = np.flatnonzero(labels == label)
        n_drop = int(round((1.0 - share[k]) * cells.size))
        keep[cells[np.argsort(prob[cells])[:n_drop]]] = False
    return keep


def evaluate(model, adata, prior: str, timing: dict, responders=None, weights=None) -> dict:
    from pybivi.tl.metrics import program_ari

    perturbed = (adata.obs["perturbation"] != "NT").to_numpy()
    truth = adata.obs["responder"].to_numpy(bool)
    score = detection_scores(model, prior)
    has_escapers = not truth[perturbed].all()
    auroc = roc_auc_score(truth[perturbed], score[perturbed]) if has_escapers else np.nan
    salient = model.get_latent_representation(kind="salient")
    ari = program_ari(salient[truth], adata.obs["program"].astype(str).to_numpy()[truth])
    kin = kinetic_scores(model, adata, responders, weights)
    out = {"auroc": auroc, "ari": ari, **timing, "kinetic": kin}
    if prior == "mixture":
        p = score[perturbed]
        out["share_undecided"] = float(np.mean((p > 0.1) & (p < 0.9)))  # not near 0 or 1
        out["called_escapers"] = float(np.mean(p <= 0.5))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--escape", type=float, default=0.3)
    parser.add_argument("--refit", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for tag, escape in (("escapers", args.escape), ("no_escapers", 0.0)):
        adata = prepared_data(args.cells, args.genes, escape)
        print(f"{tag}: {adata.n_obs} cells x {adata.n_vars} genes, "
              f"{int((~adata.obs['responder'] & (adata.obs['perturbation'] != 'NT')).sum())} "
              "escapers")  # fmt: skip
        for prior in ("normal", "mixture"):
            model, timing = fit_or_load(adata, prior, tag, args)
            results[(tag, prior)] = evaluate(model, adata, prior, timing)
            if tag == "escapers" and prior == "normal":
                oracle = adata.obs["responder"].to_numpy(bool)
                results[(tag, "normal+oracle")] = evaluate(
                    model, adata, prior, timing, responders=oracle
                )
            if tag == "escapers" and prior == "mixture":
                soft = model.get_perturbation_probability()
                results[(tag, "mixture+soft")] = evaluate(
                    model, adata, prior, timing, weights=soft
                )
                top = top_share_responders(model, adata)
                results[(tag, "mixture+top_share")] = evaluate(
                    model, adata, prior, timing, responders=top
                )
    summary = pd.DataFrame(
        {
            f"{tag}/{prior}": {
                "auroc": r["auroc"],
                "ari": r["ari"],
                "min_precision": r["kinetic"]["precision"].min(),
                "mean_precision": r["kinetic"]["precision"].mean(),
                "min_recall": r["kinetic"]["recall"].min(),
                "mean_recall": r["kinetic"]["recall"].mean(),
                "s_per_epoch": r["s_per_epoch"],
                "cpu_s_per_epoch": r["cpu_s_per_epoch"],
                "share_undecided": r.get("share_undecided", np.nan),
                "called_escapers": r.get("called_escapers", np.nan),
            }
            for (tag, prior), r in results.items()
        }
    ).T
    per_program = pd.concat(
        {f"{tag}/{prior}": r["kinetic"] for (tag, prior), r in results.items()}, axis=1
    )
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print("\nper program (kinetic calls of burst size or gamma/k):")
        print(per_program.round(3).to_string())
        print("\nsummary:")
        print(summary.round(3).to_string())


if __name__ == "__main__":
    docs_output.run(main)
