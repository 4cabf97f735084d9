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

__all__ = ["Report", "Section", "FigureRef", "table_html"]

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
