"""The tutorials run end to end (small sizes) and check what they claim.

Each tutorial is a jupytext percent script that ``assert``s true properties of its results
(a loss that decreases, a new reaction scheme whose probabilities sum to one, calibration
fractions in [0, 1], a report folder with its files...). Here every tutorial runs in a fresh
interpreter with ``PYBIVI_TUTORIAL_FAST=1`` and its outputs in a temporary folder; the test
checks the exit status, the files the tutorial says it writes, and a line it prints.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"

# (script, files it must write under PYBIVI_TUTORIAL_OUT, a string its output must contain)
CASES = [
    ("01_quickstart.py", ["salient_space.png", "kinetic_bayes_factors.csv"], "program ARI"),
    ("02_extending_in_pyro.py", ["learned_salient_scales.csv"], "ELBO per cell"),
    ("03_posterior_predictive_checks.py", ["ppc_simulated.png", "calibration_simulated.png"],
     "fraction_central_95"),
    ("04_reaction_schemes.py", ["scheme_comparison.csv"], "sum of probabilities = 1.0000"),
    ("05_bring_your_own_data.py", ["my_screen.h5ad", "report/index.html",
                                   "report/metrics.json"], "report files:"),
]


def _run(script: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        PYBIVI_TUTORIAL_FAST="1",
        PYBIVI_TUTORIAL_OUT=str(out),
        MPLBACKEND="Agg",
        # One thread: the tutorials must fit the CI budget on one core, and several test
        # processes share the machine.
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        NUMBA_NUM_THREADS="1",
        PYTHONHASHSEED="0",
        # This checkout's package, whatever an editable install in the environment points at.
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    return subprocess.run(
        [sys.executable, str(TUTORIALS / script)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("script", "files", "printed"), CASES, ids=[c[0][:2] for c in CASES])
def test_tutorial_runs(script: str, files: list[str], printed: str, tmp_path: Path) -> None:
    result = _run(script, tmp_path)
    log = result.stdout[-6000:] + "\n--- stderr ---\n" + result.stderr[-6000:]
    assert result.returncode == 0, log
    for name in files:
        assert (tmp_path / name).is_file(), f"{script} did not write {name}\n{log}"
    assert printed in result.stdout, log


def test_tutorials_are_percent_scripts_with_a_title() -> None:
    """Each tutorial renders as a notebook page: percent cells and a level-1 heading first."""
    scripts = sorted(TUTORIALS.glob("[0-9]*.py"))
    assert [s.name for s in scripts] == [c[0] for c in CASES]
    for script in scripts:
        text = script.read_text()
        cells = [c for c in text.split("# %%") if c.strip()]
        first_markdown = next(c for c in cells if c.startswith(" [markdown]"))
        assert first_markdown.split("\n")[1].startswith("# # "), script.name
        assert "PYBIVI_TUTORIAL_FAST" in text and "PYBIVI_TUTORIAL_OUT" in text, script.name


def test_tutorials_are_listed_in_the_docs() -> None:
    page = (ROOT / "docs" / "tutorials.md").read_text()
    for script, _, _ in CASES:
        assert f"tutorials/{script[:-3]}" in page
