"""The analysis behind ``pybivi demo`` and ``pybivi fit``: fit, evaluate, report.

:func:`run_pipeline` fits ContrastiveBiVI, biVI, scVI and ContrastiveVI (any subset)
for one or more seeds on a prepared AnnData, computes the paper's figure-2 metrics
(appendix D) on the perturbed cells, writes the representations and ContrastiveBiVI's
kinetic parameters back into the AnnData, and writes the report folder (figure 2,
the compensatory-program check, kinetic recovery on simulated data, figure 3 from
:mod:`pybivi.tl.de`, optionally a posterior-predictive check from :mod:`pybivi.tl.ppc`).
"""

from __future__ import annotations

import html
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["run_pipeline", "kinetic_estimates", "log_step", "MODEL_NAMES", "DISPLAY"]

MODEL_NAMES = ("ContrastiveBiVI", "BiVI", "SCVI", "ContrastiveVI")
"""The four models of the paper's figure 2, in display order."""

DISPLAY = {
    "ContrastiveBiVI": "ContrastiveBiVI (N+M)",
    "BiVI": "biVI (N+M)",
    "SCVI": "scVI (M)",
    "ContrastiveVI": "ContrastiveVI (M)",
}


def log_step(message: str, quiet: bool) -> None:
    """Print a progress message to stderr unless ``quiet``."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _fit_one(
    name: str, adata: Any, perturbation_key: str, controls: list[str], seed: int,
    epochs: int, batch_size: int, quiet: bool, frequency_init: str = "auto",
) -> Any:
    """Set up, build and train one model (its own progress bar shows the epochs)."""
    import pybivi

    cls = getattr(pybivi, name)
    cls.setup_anndata(adata, perturbation_key=perturbation_key, control_labels=controls)
    model = cls(adata, seed=seed, frequency_init=frequency_init)
    model.train(max_epochs=epochs, batch_size=batch_size, seed=seed, progress_bar=not quiet)
    return model


def _evaluate(
    rep: np.ndarray, obs: pd.DataFrame, perturbed: np.ndarray,
    program_key: str | None, phase_key: str | None,
) -> tuple[dict[str, float], pd.Series | None]:
    """Appendix D metrics on the perturbed cells, and per-program neighbour purity."""
    from pybivi.tl import metrics

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
    from pybivi._draws import iter_draws

    names = tuple(model.module.scheme.kinetic_param_names)
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for _, draws in iter_draws(
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
    epochs: int = 60,
    batch_size: int = 128,
    embedding: str = "umap",
    quiet: bool = False,
    title: str = "pybivi report",
    intro: str = "",
    differential: bool = True,
    predictive_check: bool = False,
    frequency_init: str = "auto",
) -> dict[str, Any]:
    """Fit every model for every seed, evaluate, and write the report folder.

    With ``differential``, the seed-0 models also give the paper's figure 3 (differential
    tests of ``b`` and ``gamma/k`` against mean expression, :func:`pybivi.report.figure3`);
    with ``predictive_check``, a posterior-predictive section (:func:`pybivi.report.ppc_section`).
    ``frequency_init`` is passed to every model class.

    Writes ``out/index.html`` with figures beside it, ``out/metrics.json``,
    ``out/models/<Model>_seed<k>/`` and ``out/adata.h5ad`` (representations in
    ``obsm["X_<Model>"]`` for seed 0 and ``obsm["X_<Model>_seed<k>"]``; ContrastiveBiVI's
    posterior-mean kinetic parameters at the reference library in layers
    ``ContrastiveBiVI_<param>``). Returns the metrics dictionary.
    """
    import torch

    from pybivi.report import _sections as sections
    from pybivi.report._html import Report

    threads = torch.get_num_threads()
    out.mkdir(parents=True, exist_ok=True)
    is_ctrl = adata.obs[perturbation_key].astype(str).isin(controls).to_numpy()
    perturbed = ~is_ctrl
    fits = _fit_all(
        adata, out, perturbation_key=perturbation_key, controls=controls,
        program_key=program_key, phase_key=phase_key, models=models, seeds=seeds,
        epochs=epochs, batch_size=batch_size, quiet=quiet, frequency_init=frequency_init,
    )
    table, purity_table, first = fits["table"], fits["purity"], fits["first"]
    log_step("writing the report", quiet)
    kinetic = None
    if "ContrastiveBiVI" in first:
        kinetic = kinetic_estimates(first["ContrastiveBiVI"])
        for k, v in kinetic.items():
            adata.layers[f"ContrastiveBiVI_{k}"] = v
    summary = _summary(table, purity_table, models, seeds, epochs, adata, perturbed)
    summary["fit_seconds"] = fits["seconds"]
    report = Report(out, title=title)
    sections.add_figure2(
        report, adata, table, purity_table, models=models, program_key=program_key,
        phase_key=phase_key, perturbed=perturbed, embedding=embedding, intro=intro,
        display=DISPLAY, quiet=quiet,
    )
    torch.set_num_threads(threads)  # the UMAP embeddings above reset it
    if kinetic is not None and program_key is not None and "simulation" in adata.uns:
        summary["kinetic_recovery"] = sections.add_kinetic_recovery(
            report, adata, program_key, is_ctrl
        )
    groupby = program_key if program_key is not None else perturbation_key
    if differential and "ContrastiveBiVI" in first:
        log_step("figure 3: kinetic and mean-expression tests", quiet)
        summary["figure3"] = _optional_section(
            report, "Figure 3: kinetic vs mean-expression differential tests", "figure3",
            lambda: _figure3(first, groupby, adata),
        )
    if predictive_check and first:
        name = "ContrastiveBiVI" if "ContrastiveBiVI" in first else next(iter(first))
        log_step(f"posterior-predictive check of {name}", quiet)
        summary["ppc"] = _optional_section(
            report, f"Posterior-predictive check ({DISPLAY.get(name, name)})", "ppc",
            lambda: _predictive(first[name], adata.n_obs),
        )
    (out / "metrics.json").write_text(json.dumps(_finite(summary), indent=1, default=float))
    report.write()
    log_step(f"writing {out / 'adata.h5ad'}", quiet)
    adata.write_h5ad(out / "adata.h5ad")
    return summary


def _fit_all(
    adata: Any, out: Path, *, perturbation_key: str, controls: list[str],
    program_key: str | None, phase_key: str | None, models: Sequence[str], seeds: int,
    epochs: int, batch_size: int, quiet: bool, frequency_init: str = "auto",
) -> dict[str, Any]:
    """Fit each model for each seed, store representations, evaluate, save the models."""
    import torch
    from tqdm.auto import tqdm

    # Other libraries may reset the OpenMP thread count (umap-learn's numba does), which
    # would undo `pybivi --threads`: re-apply the caller's setting before every fit.
    threads = torch.get_num_threads()
    perturbed = ~adata.obs[perturbation_key].astype(str).isin(controls).to_numpy()
    rows, purity_rows, seconds, first = [], [], {}, {}
    bar = tqdm([(s, m) for s in range(seeds) for m in models], desc="models", unit="fit",
               disable=quiet)
    for seed, name in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        model = _fit_one(
            name, adata, perturbation_key, controls, seed, epochs, batch_size, quiet,
            frequency_init,
        )
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
    from pybivi.report._figure3 import figure3

    truth = adata if "simulation" in adata.uns else None
    return figure3(
        models["ContrastiveBiVI"], scvi=models.get("SCVI"),
        contrastive_vi=models.get("ContrastiveVI"), groupby=groupby, reference="control",
        truth=truth,
    )


def _predictive(model: Any, n_cells: int, max_cells: int = 500) -> dict[str, Any]:
    from pybivi.tl import ppc

    # Replicates cost exact CME draws per cell and gene: check a random subset of cells.
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(n_cells, size=min(n_cells, max_cells), replace=False))
    from pybivi.report import _ppc as ppc_report

    return ppc_report.section(ppc.ppc(model, n_replicates=10, indices=idx))


def _optional_section(report: Any, title: str, key: str, build: Any) -> dict[str, Any]:
    """Add a section from a builder returning ``figures``/``text`` (and tables).

    A failure here must not lose the fitted models and figure 2, so it is reported in
    the section (and returned for metrics.json) instead of raised.
    """
    from pybivi.report._html import table_html

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


