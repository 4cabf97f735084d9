"""The ``pybivi`` command line: ``demo``, ``fit``, ``simulate`` and ``approximator train``.

``pybivi demo`` simulates a CRISPR screen with known kinetics, prepares it, fits
ContrastiveBiVI, BiVI, SCVI and ContrastiveVI and writes a report folder that
reproduces the paper's figure 2 on data whose truth is known. ``pybivi fit``
runs the same pipeline on a user's ``.h5ad``/``.loom`` file.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["main", "build_parser", "run_pipeline", "MODEL_NAMES"]

MODEL_NAMES = ("ContrastiveBiVI", "BiVI", "SCVI", "ContrastiveVI")
"""The four models of the paper's figure 2, in display order."""

DISPLAY = {
    "ContrastiveBiVI": "ContrastiveBiVI (N+M)",
    "BiVI": "biVI (N+M)",
    "SCVI": "scVI (M)",
    "ContrastiveVI": "ContrastiveVI (M)",
}


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _parse_models(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    lookup = {m.lower(): m for m in MODEL_NAMES}
    bad = [m for m in names if m.lower() not in lookup]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {bad or text!r}; choose from {', '.join(MODEL_NAMES)}"
        )
    return [lookup[m.lower()] for m in names]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fit_one(
    name: str, adata: Any, perturbation_key: str, controls: list[str], seed: int,
    epochs: int, batch_size: int, quiet: bool,
) -> Any:
    """Set up, build and train one model (its own progress bar shows the epochs)."""
    import pybivi

    cls = getattr(pybivi, name)
    cls.setup_anndata(adata, perturbation_key=perturbation_key, control_labels=controls)
    model = cls(adata, seed=seed)
    model.train(max_epochs=epochs, batch_size=batch_size, seed=seed, progress_bar=not quiet)
    return model


def _evaluate(
    rep: np.ndarray, obs: pd.DataFrame, perturbed: np.ndarray,
    program_key: str | None, phase_key: str | None,
) -> tuple[dict[str, float], pd.Series | None]:
    """Appendix D metrics on the perturbed cells, and per-program neighbour purity."""
    from pybivi import metrics

    out: dict[str, float] = {}
    purity = None
    sub = rep[perturbed]
    n = int(perturbed.sum())
    if program_key is not None and n > 2:
        programs = obs.loc[perturbed, program_key].astype(str).to_numpy()
        out["ari"] = metrics.program_ari(sub, programs)
        purity = metrics.neighbour_purity(sub, programs, k=min(15, n - 1))
    if phase_key is not None and phase_key in obs and n > 2:
        phases = obs.loc[perturbed, phase_key].astype(str).to_numpy()
        out["mixing_entropy"] = metrics.mixing_entropy(sub, phases, k=min(50, n - 1))
    return out, purity


def kinetic_estimates(model: Any, n_samples: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Posterior-mean kinetic parameters per cell and gene, at the reference library.

    Returns ``{name: (n_cells, n_genes)}`` for each of the scheme's parameters.
    """
    from pybivi import posterior

    names = tuple(model.module.scheme.kinetic_param_names)
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for _, draws in posterior.iter_draws(
        model, n_samples=n_samples, quantities=names, libraries=("reference",),
        batch_size=256, seed=seed,
    ):
        for k in names:
            chunks[k].append(draws["reference"][k].mean(0).cpu().numpy())
    return {k: np.concatenate(v).astype(np.float32) for k, v in chunks.items()}


def run_pipeline(
    adata: Any,
    out: Path,
    *,
    perturbation_key: str,
    controls: list[str],
    program_key: str | None,
    phase_key: str | None,
    models: Sequence[str] = MODEL_NAMES,
    seeds: int = 1,
    epochs: int = 30,
    batch_size: int = 128,
    embedding: str = "umap",
    quiet: bool = False,
    title: str = "pybivi report",
    intro: str = "",
    differential: bool = True,
    predictive_check: bool = False,
) -> dict[str, Any]:
    """Fit every model for every seed, evaluate, and write the report folder.

    With ``differential``, the seed-0 models also give the paper's figure 3 (Bayes-factor
    tests of ``b`` and ``gamma/k`` against mean expression, :func:`pybivi.de.figure3`);
    with ``predictive_check``, a posterior-predictive section (:func:`pybivi.ppc.section`).

    Writes ``out/index.html`` with figures beside it, ``out/metrics.json``,
    ``out/models/<Model>_seed<k>/`` and ``out/adata.h5ad`` (representations in
    ``obsm["X_<Model>"]`` for seed 0 and ``obsm["X_<Model>_seed<k>"]``; ContrastiveBiVI's
    posterior-mean kinetic parameters at the reference library in layers
    ``ContrastiveBiVI_<param>``). Returns the metrics dictionary.
    """
    from pybivi import report as rep_mod

    out.mkdir(parents=True, exist_ok=True)
    is_ctrl = adata.obs[perturbation_key].astype(str).isin(controls).to_numpy()
    perturbed = ~is_ctrl
    fits = _fit_all(
        adata, out, perturbation_key=perturbation_key, controls=controls,
        program_key=program_key, phase_key=phase_key, models=models, seeds=seeds,
        epochs=epochs, batch_size=batch_size, quiet=quiet,
    )
    table, purity_table, first = fits["table"], fits["purity"], fits["first"]
    _log("writing the report", quiet)
    kinetic = None
    if "ContrastiveBiVI" in first:
        kinetic = kinetic_estimates(first["ContrastiveBiVI"])
        for k, v in kinetic.items():
            adata.layers[f"ContrastiveBiVI_{k}"] = v
    summary = _summary(table, purity_table, models, seeds, epochs, adata, perturbed)
    summary["fit_seconds"] = fits["seconds"]
    report = rep_mod.Report(out, title=title)
    rep_mod.add_figure2(
        report, adata, table, purity_table, models=models, program_key=program_key,
        phase_key=phase_key, perturbed=perturbed, embedding=embedding, intro=intro,
        display=DISPLAY, quiet=quiet,
    )
    if kinetic is not None and program_key is not None and "simulation" in adata.uns:
        summary["kinetic_recovery"] = rep_mod.add_kinetic_recovery(
            report, adata, program_key, is_ctrl
        )
    groupby = program_key if program_key is not None else perturbation_key
    if differential and "ContrastiveBiVI" in first:
        _log("figure 3: Bayes-factor tests of kinetic parameters and mean expression", quiet)
        summary["figure3"] = _optional_section(
            report, "Figure 3: kinetic vs mean-expression differential tests", "figure3",
            lambda: _figure3(first, groupby, adata),
        )
    if predictive_check and first:
        name = "ContrastiveBiVI" if "ContrastiveBiVI" in first else next(iter(first))
        _log(f"posterior-predictive check of {name}", quiet)
        summary["ppc"] = _optional_section(
            report, f"Posterior-predictive check ({DISPLAY.get(name, name)})", "ppc",
            lambda: _predictive(first[name], adata.n_obs),
        )
    (out / "metrics.json").write_text(json.dumps(_finite(summary), indent=1, default=float))
    report.write()
    _log(f"writing {out / 'adata.h5ad'}", quiet)
    adata.write_h5ad(out / "adata.h5ad")
    return summary


def _fit_all(
    adata: Any, out: Path, *, perturbation_key: str, controls: list[str],
    program_key: str | None, phase_key: str | None, models: Sequence[str], seeds: int,
    epochs: int, batch_size: int, quiet: bool,
) -> dict[str, Any]:
    """Fit each model for each seed, store representations, evaluate, save the models."""
    from tqdm.auto import tqdm

    perturbed = ~adata.obs[perturbation_key].astype(str).isin(controls).to_numpy()
    rows, purity_rows, seconds, first = [], [], {}, {}
    bar = tqdm([(s, m) for s in range(seeds) for m in models], desc="models", unit="fit",
               disable=quiet)
    for seed, name in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        t0 = time.perf_counter()
        model = _fit_one(name, adata, perturbation_key, controls, seed, epochs, batch_size, quiet)
        seconds[f"{name}_seed{seed}"] = round(time.perf_counter() - t0, 1)
        rep = model.get_latent_representation()
        adata.obsm[f"X_{name}_seed{seed}"] = rep
        if seed == 0:
            adata.obsm[f"X_{name}"] = rep
            first[name] = model
        scores, purity = _evaluate(rep, adata.obs, perturbed, program_key, phase_key)
        rows.append({"model": name, "seed": seed, **scores})
        if purity is not None:
            purity_rows += [
                {"model": name, "seed": seed, "program": p, "purity": v} for p, v in purity.items()
            ]
        model.save(out / "models" / f"{name}_seed{seed}", overwrite=True)
    return {"table": pd.DataFrame(rows), "purity": pd.DataFrame(purity_rows),
            "seconds": seconds, "first": first}


def _summary(
    table: pd.DataFrame, purity: pd.DataFrame, models: Sequence[str], seeds: int, epochs: int,
    adata: Any, perturbed: np.ndarray,
) -> dict[str, Any]:
    """What metrics.json holds: settings, per-seed metrics, their mean and spread."""
    summary: dict[str, Any] = {
        "models": list(models), "seeds": seeds, "epochs": epochs, "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars), "n_perturbed": int(perturbed.sum()),
        "per_seed": table.to_dict("records"),
    }
    metric_cols = [c for c in ("ari", "mixing_entropy") if c in table]
    if metric_cols:
        agg = table.groupby("model")[metric_cols].agg(["mean", "std"])
        summary["summary"] = {
            m: {f"{c}_{s}": float(agg.loc[m, (c, s)]) for c in metric_cols for s in ("mean", "std")}
            for m in agg.index
        }
    if len(purity):
        summary["program_purity"] = (
            purity.groupby(["model", "program"])["purity"].mean().unstack().to_dict("index")
        )
    return summary


def _figure3(models: dict[str, Any], groupby: str, adata: Any) -> dict[str, Any]:
    from pybivi import de

    truth = adata if "simulation" in adata.uns else None
    return de.figure3(
        models["ContrastiveBiVI"], scvi=models.get("SCVI"),
        contrastive_vi=models.get("ContrastiveVI"), groupby=groupby, reference="control",
        truth=truth,
    )


def _predictive(model: Any, n_cells: int, max_cells: int = 500) -> dict[str, Any]:
    from pybivi import ppc

    # Replicates cost exact CME draws per cell and gene: check a random subset of cells.
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(n_cells, size=min(n_cells, max_cells), replace=False))
    return ppc.section(ppc.ppc(model, n_replicates=10, indices=idx))


def _optional_section(report: Any, title: str, key: str, build: Any) -> dict[str, Any]:
    """Add a section from a builder returning ``figures``/``text`` (and tables).

    A failure here must not lose the fitted models and figure 2, so it is reported in
    the section (and returned for metrics.json) instead of raised.
    """
    from pybivi.report import table_html

    try:
        result = build()
    except Exception as err:  # noqa: BLE001
        message = f"{type(err).__name__}: {err}"
        report.add_section(title, f"<p>This section could not be computed: "
                           f"<code>{html.escape(message)}</code></p>", key=key)
        return {"error": message}
    body = f"<pre>{html.escape(str(result.get('text', '')))}</pre>"
    digest: dict[str, Any] = {}
    for name in ("counts", "truth", "summary", "compensatory"):
        table = result.get(name)
        if isinstance(table, pd.DataFrame) and len(table):
            body += f"<h3>{html.escape(name)}</h3>" + table_html(table)
            digest[name] = json.loads(table.to_json(orient="index"))
    figures = [
        (fig, f"{key}_{name}.png", name.replace("_", " "))
        for name, fig in (result.get("figures") or {}).items()
    ]
    report.add_section(title, body, figures, key=key)
    return digest


def _finite(obj: Any) -> Any:
    """NaN (e.g. the spread of a single seed) -> None, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------- commands
def _cmd_demo(args: argparse.Namespace) -> int:
    from pybivi import datasets, pp

    quiet = args.quiet
    _log(f"simulating {args.cells} cells x {args.genes} genes (exact bursty CME draws)", quiet)
    raw = datasets.simulate_perturbseq(
        n_cells=args.cells, n_genes=args.genes, n_programs=args.programs, seed=args.data_seed,
        progress_bar=not quiet,
    )
    _log("preparing (appendix B: doublets, program filter, highly variable genes)", quiet)
    adata = pp.prepare(
        raw, perturbation_key="perturbation", control_labels="NT", program_key="program",
        score_cell_cycle=False, n_top_genes=args.n_top_genes,
    )
    kinds = dict(zip(raw.uns["simulation"]["programs"], raw.uns["simulation"]["program_kinds"],
                     strict=True))
    adata.uns["program_kinds"] = kinds
    intro = (
        f"<p>Simulated screen: {raw.n_obs} cells, {raw.n_vars} genes, {args.programs} gene "
        f"programs (kinds: {', '.join(f'{p} = {k}' for p, k in kinds.items())}), counts drawn "
        "exactly from the bursty CME. The cell-cycle phase is the simulator's truth. After "
        f"preparation (doublets and unannotated weak perturbations dropped): {adata.n_obs} "
        f"cells x {adata.n_vars} genes. {args.epochs} epochs per model, {args.seeds} seed(s).</p>"
    )
    summary = run_pipeline(
        adata, Path(args.out), perturbation_key="perturbation", controls=["NT"],
        program_key="program", phase_key="phase", models=args.models, seeds=args.seeds,
        epochs=args.epochs, batch_size=args.batch_size, embedding=args.embedding, quiet=quiet,
        title="pybivi demo: figures 2 and 3 on a simulated screen", intro=intro,
        differential=not args.no_de, predictive_check=args.ppc,
    )
    _print_summary(summary, Path(args.out))
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from pybivi import datasets, pp

    quiet = args.quiet
    _log(f"reading {args.data}", quiet)
    adata = datasets.read(args.data)
    if args.program_key is not None and args.program_key not in adata.obs:
        raise KeyError(f"--program-key {args.program_key!r} is not a column of the data's obs")
    _log("preparing (appendix B: filters, cell-cycle phase, highly variable genes)", quiet)
    prepared = pp.prepare(
        adata, perturbation_key=args.perturbation_key, control_labels=args.control,
        program_key=args.program_key, drop_labels=args.drop_label or (),
        doublet_key=args.doublet_key, score_cell_cycle=not args.no_cell_cycle,
        phase_key=args.phase_key, n_top_genes=args.n_top_genes,
    )
    phase_key = args.phase_key if args.phase_key in prepared.obs else None
    summary = run_pipeline(
        prepared, Path(args.out), perturbation_key=args.perturbation_key,
        controls=list(args.control), program_key=args.program_key, phase_key=phase_key,
        models=args.models, seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size,
        embedding=args.embedding, quiet=quiet, title=f"pybivi fit: {Path(args.data).name}",
        differential=not args.no_de, predictive_check=args.ppc,
    )
    _print_summary(summary, Path(args.out))
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from pybivi import datasets

    adata = datasets.simulate_perturbseq(
        n_cells=args.cells, n_genes=args.genes, n_programs=args.programs, seed=args.seed,
        progress_bar=not args.quiet,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(args.output)
    _log(f"wrote {args.output}: {adata.n_obs} cells x {adata.n_vars} genes", args.quiet)
    return 0


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    for model, vals in summary.get("summary", {}).items():
        parts = [f"{k}={v:.3f}" for k, v in vals.items() if np.isfinite(v)]
        print(f"{DISPLAY.get(model, model):24s} " + " ".join(parts))
    print(f"report: {out / 'index.html'}")


def _add_fit_options(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--models", type=_parse_models, default=list(MODEL_NAMES),
                   help="comma-separated models to fit (default: all four)")
    p.add_argument("--epochs", type=_positive_int, default=epochs,
                   help=f"training epochs per model (default {epochs}; the paper uses 100)")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="number of training seeds; figures show mean and spread (default 1)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="minibatch size")
    p.add_argument("--embedding", choices=("umap", "pca"), default="umap",
                   help="2-D embedding of the figures (umap as the paper; pca is instant)")
    p.add_argument("--no-de", action="store_true",
                   help="skip figure 3 (Bayes-factor tests of b, gamma/k and mean expression)")
    p.add_argument("--ppc", action="store_true",
                   help="add a posterior-predictive check of ContrastiveBiVI (500 cells)")
    # One thread by default: on a shared 2-core machine two torch threads spin-wait on
    # each other (measured 40 s vs 5.4 s per ContrastiveBiVI epoch at load average 8).
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: robust when the CPU is shared; "
                   "more can help on an idle multi-core machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def build_parser() -> argparse.ArgumentParser:
    """The ``pybivi`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="pybivi",
        description="Biophysical, contrastive analysis of single-cell CRISPR screens "
        "(ContrastiveBiVI) with nascent and mature counts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="simulate a screen, fit the four models, write the figure-2 report",
        description="Simulate a CRISPR screen with known kinetics (exact CME draws), prepare "
        "it, fit ContrastiveBiVI, biVI, scVI and ContrastiveVI, and write a report folder "
        "(index.html with PNG figures, metrics.json, the models and the AnnData).",
    )
    demo.add_argument("--cells", type=_positive_int, default=3000, help="simulated cells")
    demo.add_argument("--genes", type=_positive_int, default=800, help="simulated genes")
    demo.add_argument("--programs", type=_positive_int, default=6, help="gene programs")
    demo.add_argument("--n-top-genes", type=_positive_int, default=2000,
                      help="highly variable genes kept (default 2000, the paper's)")
    demo.add_argument("--data-seed", type=int, default=0, help="seed of the simulation")
    demo.add_argument("--out", default="results/demo", help="report folder")
    _add_fit_options(demo, epochs=30)
    demo.set_defaults(func=_cmd_demo)

    fit = sub.add_parser(
        "fit", help="run the pipeline on your own .h5ad or .loom file",
        description="Prepare a screen with spliced/unspliced layers (velocyto, kb-python, "
        "STARsolo), fit the models, write representations and ContrastiveBiVI's kinetic "
        "parameters back into the AnnData, and write the report.",
    )
    fit.add_argument("data", help=".h5ad or .loom file with spliced and unspliced layers")
    fit.add_argument("--perturbation-key", required=True, help="obs column of perturbation labels")
    fit.add_argument("--control", action="append", required=True,
                     help="control label (repeat for several)")
    fit.add_argument("--program-key", help="obs column of gene programs (enables ARI; "
                     "perturbed cells without one are dropped, as in the paper)")
    fit.add_argument("--drop-label", action="append", help="perturbation label to remove")
    fit.add_argument("--doublet-key", default="doublet", help="boolean obs column of doublets")
    fit.add_argument("--phase-key", default="phase", help="obs column of cell-cycle phase")
    fit.add_argument("--no-cell-cycle", action="store_true",
                     help="do not score the phase with the Tirosh markers")
    fit.add_argument("--n-top-genes", type=_positive_int, default=2000,
                     help="highly variable genes kept")
    fit.add_argument("--out", default="results/fit", help="report folder")
    _add_fit_options(fit, epochs=100)
    fit.set_defaults(func=_cmd_fit)

    sim = sub.add_parser("simulate", help="write a simulated screen to an .h5ad file",
                         description="Simulate a screen with known kinetics and save it.")
    sim.add_argument("output", help="output .h5ad path")
    sim.add_argument("--cells", type=_positive_int, default=3000)
    sim.add_argument("--genes", type=_positive_int, default=800)
    sim.add_argument("--programs", type=_positive_int, default=6)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--quiet", action="store_true")
    sim.set_defaults(func=_cmd_simulate)

    appr = sub.add_parser(
        "approximator", help="the neural approximation of the bursty P(mature | nascent)",
        description="Manage the bursty conditional approximator shipped in pybivi/cme/weights.",
    )
    actions = appr.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    # Options belong to pybivi.cme.training.main, which parses them (and prints --help).
    train = actions.add_parser(
        "train", add_help=False,
        help="regenerate the weights from exact CME solutions (options: train --help)",
    )
    train.set_defaults(func=_cmd_approximator_train)
    return parser


def _cmd_approximator_train(args: argparse.Namespace) -> int:
    from pybivi.cme import training

    return int(training.main(args.extra) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pybivi`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "func", None) is _cmd_approximator_train:
        args.extra = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        # User errors: one line naming the problem, no traceback.
        message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
        # Pyro appends a table of trace shapes to errors raised inside a model: keep the
        # lines that say what went wrong.
        lines = message.splitlines()
        if len(lines) > 3:
            message = "\n".join(lines[:2])
        print(f"pybivi {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
