"""A static HTML report: a list of sections, each a title, some HTML and PNG figures.

The report folder holds ``index.html`` (opens from disk, no server, no scripts)
and the figures beside it, plus ``report.json``, the section list, so that
another step can add a section later::

    from pybivi.report import Report

    report = Report.open("results/demo")          # or Report("folder", title=...)
    fig = ...                                     # a matplotlib Figure
    report.add_section("Figure 3: kinetic DE", html="<p>...</p>",
                       figures=[(fig, "fig3a.png", "Genes with kinetic shifts")])
    report.write()

Sections keep their order; a section added with an existing ``key`` replaces the
old one in place, so re-running a step does not duplicate it.
"""

from __future__ import annotations

import dataclasses
import html
import json
import shutil
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["Report", "Section", "FigureRef", "table_html", "add_figure2"]

_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; max-width: 520px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } .meta { color: #777; font-size: 0.85em; }
nav a { margin-right: 1em; }
"""


@dataclasses.dataclass
class FigureRef:
    """A PNG file inside the report folder and its caption."""

    file: str
    caption: str = ""


@dataclasses.dataclass
class Section:
    """One report section: title, trusted HTML body, figures (files in the folder)."""

    title: str
    html: str = ""
    figures: list[FigureRef] = dataclasses.field(default_factory=list)
    key: str = ""


def table_html(table: pd.DataFrame, float_format: str = "{:.3f}", index: bool = True) -> str:
    """Render a DataFrame as a plain HTML table (numbers formatted, text escaped)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "&ndash;" if np.isnan(v) else float_format.format(v)
        return html.escape(str(v))

    head = ([html.escape(str(table.index.name or ""))] if index else []) + [
        html.escape(str(c)) for c in table.columns
    ]
    rows = []
    for idx, row in table.iterrows():
        cells = ([f"<th>{html.escape(str(idx))}</th>"] if index else []) + [
            f"<td>{fmt(v)}</td>" for v in row.tolist()
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


class Report:
    """An HTML report being assembled in ``folder``.

    Parameters
    ----------
    folder
        Output folder (created).
    title
        Page title.
    """

    def __init__(self, folder: str | Path, title: str = "pybivi report") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.sections: list[Section] = []

    @classmethod
    def open(cls, folder: str | Path) -> Report:
        """Re-open a report written by :meth:`write` (to add sections to it)."""
        folder = Path(folder)
        state_file = folder / "report.json"
        if not state_file.exists():
            raise FileNotFoundError(f"no pybivi report in {folder} (report.json missing)")
        state = json.loads(state_file.read_text())
        report = cls(folder, title=state.get("title", "pybivi report"))
        for s in state["sections"]:
            figs = [FigureRef(**f) for f in s.get("figures", [])]
            report.sections.append(Section(s["title"], s.get("html", ""), figs, s.get("key", "")))
        return report

    def _store_figure(self, item: Any) -> FigureRef:
        """Store ``(Figure, file name, caption)``, ``(path, caption)`` or a path in the folder."""
        if isinstance(item, FigureRef):
            return item
        if not isinstance(item, tuple):
            item = (item,)
        source, rest = item[0], list(item[1:])
        if hasattr(source, "savefig"):
            if not rest:
                raise ValueError("a matplotlib figure needs a name: (fig, 'name.png', caption)")
            name = str(rest.pop(0))
            source.savefig(self.folder / name, dpi=110)
            import matplotlib.pyplot as plt

            plt.close(source)
        else:
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(f"figure file {path} does not exist")
            name = path.name
            if path.resolve().parent != self.folder.resolve():
                shutil.copy(path, self.folder / name)
        caption = str(rest[0]) if rest else ""
        return FigureRef(name, caption)

    def add_section(
        self,
        title: str,
        html: str = "",
        figures: Iterable[Any] = (),
        key: str | None = None,
        position: int | None = None,
    ) -> Section:
        """Add (or, with an existing ``key``, replace) a section.

        Parameters
        ----------
        title
            Section heading (escaped).
        html
            Body HTML, inserted as is (use :func:`table_html` for tables).
        figures
            Items ``(fig, "name.png", "caption")`` for a matplotlib figure (saved into
            the folder), ``(path, "caption")`` or a path for an existing PNG (copied in).
        key
            Identifier; defaults to the title.
        position
            Index to insert at (default: the end).
        """
        section = Section(title, html, [self._store_figure(f) for f in figures], key or title)
        for i, old in enumerate(self.sections):
            if old.key == section.key:
                self.sections[i] = section
                return section
        if position is None:
            self.sections.append(section)
        else:
            self.sections.insert(position, section)
        return section

    def section_keys(self) -> Sequence[str]:
        """Keys of the sections, in order."""
        return [s.key for s in self.sections]

    def render(self) -> str:
        """The HTML page as a string."""
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: UP017
        nav = " ".join(
            f'<a href="#s{i}">{html.escape(s.title)}</a>' for i, s in enumerate(self.sections)
        )
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1><p class='meta'>Written {stamp}</p>",
            f"<nav>{nav}</nav>",
        ]
        for i, s in enumerate(self.sections):
            parts.append(f'<section id="s{i}"><h2>{html.escape(s.title)}</h2>{s.html}')
            for f in s.figures:
                src = html.escape(f.file, quote=True)
                cap = f"<figcaption>{html.escape(f.caption)}</figcaption>" if f.caption else ""
                parts.append(f'<figure><img src="{src}" alt="{src}">{cap}</figure>')
            parts.append("</section>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, filename: str = "index.html") -> Path:
        """Write the page and ``report.json``; return the page's path."""
        page = self.folder / filename
        page.write_text(self.render(), encoding="utf-8")
        state = {
            "title": self.title,
            "sections": [dataclasses.asdict(s) for s in self.sections],
        }
        (self.folder / "report.json").write_text(json.dumps(state, indent=1))
        return page


# ------------------------------------------------------------------ figure 2 sections
def _embeddings(adata, models, mask, method, quiet) -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    from pybivi import plotting

    wanted = [m for m in ("BiVI", "ContrastiveBiVI", "ContrastiveVI") if m in models]
    if not wanted:
        wanted = list(models)[:2]
    out = {}
    for name in tqdm(wanted, desc=f"{method} embeddings", disable=quiet):
        out[name] = plotting.embed(adata.obsm[f"X_{name}"][mask], method=method)
    return out


def _targets_html(table: pd.DataFrame) -> str:
    """Say, from the per-seed metrics, whether the issue's targets are met."""
    if "ari" not in table or "ContrastiveBiVI" not in set(table["model"]):
        return ""
    mean = table.groupby("model").mean(numeric_only=True)
    cb = mean.loc["ContrastiveBiVI"]
    lines = []
    others = mean.drop(index="ContrastiveBiVI")
    if len(others):
        best = others["ari"].idxmax()
        ok = cb["ari"] > others["ari"].max()
        lines.append(
            f"ContrastiveBiVI salient ARI {cb['ari']:.3f} vs best other ({best}) "
            f"{others['ari'].max():.3f}: {'highest' if ok else 'NOT highest'}."
        )
    if "BiVI" in mean.index:
        lines.append(f"ARI margin over biVI: {cb['ari'] - mean.loc['BiVI', 'ari']:+.3f}.")
    if "mixing_entropy" in mean:
        for other in ("BiVI", "SCVI"):
            if other in mean.index:
                d = cb["mixing_entropy"] - mean.loc[other, "mixing_entropy"]
                verdict = "at least" if d >= 0 else "below"
                lines.append(f"Mixing entropy {verdict} {other}'s ({d:+.3f}).")
    return "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>"


def add_figure2(
    report: Report,
    adata,
    table: pd.DataFrame,
    purity: pd.DataFrame,
    *,
    models: Sequence[str],
    program_key: str | None,
    phase_key: str | None,
    perturbed: np.ndarray,
    embedding: str = "umap",
    intro: str = "",
    display: dict[str, str] | None = None,
    quiet: bool = False,
) -> None:
    """Add the sections of the paper's figure 2 (and the compensatory-program check).

    Parameters
    ----------
    report
        The report to add to.
    adata
        Prepared data with ``obsm["X_<Model>"]`` representations.
    table
        Per model and seed metrics (columns ``model``, ``seed``, ``ari``, ``mixing_entropy``).
    purity
        Per model, seed and program neighbour purity (may be empty).
    models
        Fitted models, in display order.
    program_key, phase_key
        ``obs`` columns used for colouring (either may be ``None``).
    perturbed
        Boolean mask of the perturbed cells (the metrics' and figures' cells).
    embedding
        ``"umap"`` or ``"pca"``.
    intro
        HTML for the first section.
    display
        Display names of the models.
    quiet
        Hide progress bars.
    """
    from pybivi import plotting

    display = display or {}
    report.add_section("Data and settings", intro + table_html(
        pd.DataFrame({"cells": [adata.n_obs], "genes": [adata.n_vars],
                      "perturbed cells": [int(perturbed.sum())]}), index=False), key="data")
    coords = _embeddings(adata, models, perturbed, embedding, quiet)
    obs = adata.obs.loc[perturbed]
    colour_by = [k for k in (phase_key, program_key) if k is not None and k in obs]
    panels = []
    shown = [n for n in ("BiVI", "ContrastiveBiVI") if n in coords] or list(coords)
    for name in shown:
        space = "salient" if name in ("ContrastiveBiVI", "ContrastiveVI") else "latent"
        for key in colour_by:
            panels.append((coords[name], obs[key].astype(str).to_numpy(),
                           f"{display.get(name, name)} {space}, by {key}"))
    figs = []
    if panels:
        fig = plotting.embedding_grid(panels, ncols=max(1, len(colour_by)))
        rows = "; ".join(
            f"row {i + 1}: {display.get(n, n)}" for i, n in enumerate(shown)
        )
        figs.append((fig, "figure2_embeddings.png",
                     f"Figure 2a-d: {embedding.upper()} of the perturbed cells' representations "
                     f"({rows}; salient space for contrastive models), coloured by "
                     + " and by ".join(colour_by) + "."))
    report.add_section("Figure 2a-d: latent spaces", figures=figs, key="figure2_embeddings")

    labels = {m: display.get(m, m) for m in models}
    bars = []
    for metric, name, ylabel in (("ari", "figure2e_ari.png", "program ARI"),
                                 ("mixing_entropy", "figure2f_entropy.png",
                                  "entropy of phase mixing")):
        if metric in table and table[metric].notna().any():
            fig = plotting.metric_bars(table, metric, order=models, labels=labels, ylabel=ylabel)
            bars.append((fig, name, f"{ylabel}: mean over seeds, bars = s.d., dots = seeds"))
    stats = table.groupby("model").agg(["mean", "std"]).drop(columns="seed", level=0)
    stats.columns = [f"{a} {b}" for a, b in stats.columns]
    stats = stats.reindex(models).rename(index=labels)
    report.add_section("Figure 2e-f: program separation and cell-cycle mixing",
                       table_html(stats) + _targets_html(table), bars, key="figure2_metrics")
    _compensatory_section(report, adata, purity, coords, obs, program_key, models, labels)


def _compensatory_section(report, adata, purity, coords, obs, program_key, models, labels):
    """Programs whose only effect is kinetic: N+M models can tell them apart, M-only cannot."""
    from pybivi import plotting

    if not len(purity) or program_key is None:
        return
    kinds = dict(adata.uns.get("program_kinds", {}))
    comp = [p for p, k in kinds.items() if k == "compensatory"]
    figs = [(plotting.purity_bars(purity.replace({"model": labels}),
                                  order=[labels[m] for m in models], kinds=kinds),
             "programs_purity.png",
             "Fraction of each perturbed cell's 15 nearest neighbours from its own program, "
             "per program and model (mean over seeds).")]
    text = ("<p>Per-program neighbour purity in each model's representation. A compensatory "
            "program changes burst size and relative degradation together, so the mature mean "
            "is unchanged and only nascent counts move: mature-only models (M) cannot see it."
            "</p>")
    if comp:
        mean = purity.groupby(["model", "program"])["purity"].mean().unstack()
        shown = mean.reindex(columns=[c for c in comp if c in mean.columns]).reindex(models)
        text += table_html(shown.rename(index=labels))
        pair = [m for m in ("ContrastiveVI", "ContrastiveBiVI") if m in coords]
        if pair:
            names = " and ".join(labels[m] for m in pair)
            progs = obs[program_key].astype(str).to_numpy()
            panels = [(coords[m], progs, f"{labels[m]} salient") for m in pair]
            figs.append((plotting.embedding_grid(panels, ncols=len(panels), highlight=comp),
                         "compensatory_embeddings.png",
                         f"Compensatory programs highlighted (others grey) in the salient "
                         f"spaces of {names}."))
    report.add_section("Kinetic-only (compensatory) programs", text, figs, key="compensatory")


def kinetic_recovery(adata, program_key: str, control_mask: np.ndarray) -> pd.DataFrame:
    """Estimated vs true program-vs-control log2 changes of ``b`` and ``gamma/k``.

    Uses ContrastiveBiVI's posterior-mean kinetic layers (at the reference library)
    and the simulator's truth (``varm``, ``uns["simulation"]``); the true change of a
    program is its ``varm`` change times the mean strength of its perturbations.

    Returns
    -------
    pandas.DataFrame
        One row per program and gene: ``program``, ``gene``, ``kind`` (code),
        ``true_b``, ``est_b``, ``true_gamma``, ``est_gamma``.
    """
    sim = adata.uns["simulation"]
    table = pd.DataFrame(sim["perturbations"])
    b = np.asarray(adata.layers["ContrastiveBiVI_burst_size"], dtype=np.float64)
    g = np.asarray(adata.layers["ContrastiveBiVI_degradation_rate"], dtype=np.float64)
    labels = adata.obs[program_key].astype(str).to_numpy()
    rows = []
    for p, prog in enumerate(sim["programs"]):
        cells = labels == prog
        if not cells.any():
            continue
        strength = table.loc[table["annotated"] & (table["program"] == prog), "strength"].mean()
        est_b = np.log2(b[cells].mean(0) / b[control_mask].mean(0))
        est_g = np.log2(g[cells].mean(0) / g[control_mask].mean(0))
        rows.append(pd.DataFrame({
            "program": prog, "gene": adata.var_names, "kind": adata.varm["effect_kind"][:, p],
            "true_b": strength * adata.varm["log2_b_change"][:, p], "est_b": est_b,
            "true_gamma": strength * adata.varm["log2_gamma_change"][:, p], "est_gamma": est_g,
        }))
    return pd.concat(rows, ignore_index=True)


def add_kinetic_recovery(report: Report, adata, program_key: str, control_mask: np.ndarray):
    """Section comparing ContrastiveBiVI's kinetic shifts with the simulated truth."""
    from pybivi import metrics, plotting

    rec = kinetic_recovery(adata, program_key, control_mask)
    kind_names = list(adata.uns["simulation"]["effect_kinds"])
    changed = rec["kind"].to_numpy() > 0
    summary = {}
    for param in ("b", "gamma"):
        sub = rec.loc[changed]
        score = metrics.log2_change_recovery(sub[f"est_{param}"], sub[f"true_{param}"])
        unchanged = rec.loc[~changed, f"est_{param}"].abs()
        summary[param] = {**score, "median_abs_unchanged": float(unchanged.median())}
    table = pd.DataFrame(summary).T
    table.index = ["burst size b", "relative degradation gamma/k"]
    panels = [
        (rec["true_b"].to_numpy(), rec["est_b"].to_numpy(), rec["kind"].to_numpy(),
         "burst size b"),
        (rec["true_gamma"].to_numpy(), rec["est_gamma"].to_numpy(), rec["kind"].to_numpy(),
         "relative degradation gamma/k"),
    ]
    fig = plotting.truth_scatter(panels, kind_names)
    text = (
        "<p>Program-vs-control log2 change of ContrastiveBiVI's posterior-mean kinetic "
        "parameters (reference library, seed 0) against the simulator's truth, for every "
        "program and gene. <i>pearson</i> and <i>sign_agreement</i> are over the genes each "
        "program changes (|true change| >= 1 for sign agreement); <i>median_abs_unchanged</i> "
        "is the median |estimate| over genes the program leaves alone.</p>"
    )
    report.add_section(
        "Kinetic parameters against the truth", text + table_html(table),
        [(fig, "kinetic_recovery.png", "Estimated vs true log2 changes, by kind of effect.")],
        key="kinetic_recovery",
    )
    return summary
