"""The ``pybivi`` command line: ``demo``, ``fit``, ``simulate`` and ``approximator train``.

``pybivi demo`` simulates a CRISPR screen with known kinetics, prepares it, fits
ContrastiveBiVI, BiVI, SCVI and ContrastiveVI and writes a report folder that
reproduces the paper's figure 2 on data whose truth is known. ``pybivi fit``
runs the same pipeline on a user's ``.h5ad``/``.loom`` file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pybivi.report._pipeline import DISPLAY, MODEL_NAMES, log_step, run_pipeline

__all__ = ["main", "build_parser", "run_pipeline", "MODEL_NAMES"]


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


# ----------------------------------------------------------------------- commands
def _cmd_demo(args: argparse.Namespace) -> int:
    from pybivi import datasets, pp

    quiet = args.quiet
    log_step(f"simulating {args.cells} cells x {args.genes} genes (exact bursty CME draws)", quiet)
    raw = datasets.simulate_perturbseq(
        n_cells=args.cells, n_genes=args.genes, n_programs=args.programs, seed=args.data_seed,
        progress_bar=not quiet,
    )
    log_step("preparing (appendix B: doublets, program filter, highly variable genes)", quiet)
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
        frequency_init=args.frequency_init,
    )
    _print_summary(summary, Path(args.out))
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from pybivi import datasets, pp

    quiet = args.quiet
    log_step(f"reading {args.data}", quiet)
    adata = datasets.read(args.data)
    if args.program_key is not None and args.program_key not in adata.obs:
        raise KeyError(f"--program-key {args.program_key!r} is not a column of the data's obs")
    log_step("preparing (appendix B: filters, cell-cycle phase, highly variable genes)", quiet)
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
        frequency_init=args.frequency_init,
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
    log_step(f"wrote {args.output}: {adata.n_obs} cells x {adata.n_vars} genes", args.quiet)
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
                   help="skip figure 3 (differential tests of b, gamma/k and mean expression)")
    p.add_argument("--ppc", action="store_true",
                   help="add a posterior-predictive check of ContrastiveBiVI (500 cells)")
    p.add_argument("--frequency-init", choices=("auto", "data", "random"), default="auto",
                   help="how the decoders' gene frequencies start: 'data' (auto) starts each "
                   "gene at its share of the counts, 'random' as in the paper")
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
    # 60 epochs: at 30 ContrastiveBiVI had not yet separated the compensatory programs
    # (salient ARI 0.47 vs 0.75 at 60, 3 seeds, benchmarks/bench_demo.py).
    _add_fit_options(demo, epochs=60)
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
    # Options belong to pybivi.cme.training_cli.main, which parses them (and prints --help).
    train = actions.add_parser(
        "train", add_help=False,
        help="regenerate the weights from exact CME solutions (options: train --help)",
    )
    train.set_defaults(func=_cmd_approximator_train)
    return parser


def _cmd_approximator_train(args: argparse.Namespace) -> int:
    from pybivi.cme import training_cli

    return int(training_cli.main(args.extra) or 0)


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
