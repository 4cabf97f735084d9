"""Sphinx configuration for pybivi's documentation."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

project = "pybivi"
author = "pybivi developers"
copyright = "2026, pybivi developers"  # noqa: A001

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_nb",
]

autosummary_generate = True
autodoc_typehints = "none"
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

# Tutorials are jupytext percent scripts; CI executes them as tests, the docs render their source.
nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".py": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "conf.py", "generated/*.py"]
# The tutorials carry no kernelspec (they are plain scripts), hence no lexer hint.
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header", "mystnb.lexer"]

html_theme = "pydata_sphinx_theme"
html_title = "pybivi"
html_static_path: list[str] = []
html_theme_options = {"navigation_depth": 2, "show_toc_level": 2}

# The tutorials live at the repository root (tutorials/*.py, run by the test suite); copy them
# into the source tree at build time so that they render as pages without being duplicated in git.
_TUTORIALS_SRC = ROOT / "tutorials"
_TUTORIALS_DST = Path(__file__).resolve().parent / "tutorials"
_TUTORIALS_DST.mkdir(exist_ok=True)
for _script in sorted(_TUTORIALS_SRC.glob("[0-9]*.py")):
    (_TUTORIALS_DST / _script.name).write_text(_script.read_text())
