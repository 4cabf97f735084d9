"""The documentation builds with no warnings, and every public name has a docstring."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sphinx_builds_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / "html" / "index.html").exists()
    assert (tmp_path / "html" / "api.html").exists()


def test_public_api_is_documented() -> None:
    import pybivi

    missing = []
    for name in pybivi.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(pybivi, name)
        if inspect.ismodule(obj):
            module = importlib.import_module(obj.__name__)
            public = getattr(module, "__all__", [])
            for sub in public:
                if not inspect.getdoc(getattr(module, sub)):
                    missing.append(f"{obj.__name__}.{sub}")
        elif not inspect.getdoc(obj):
            missing.append(name)
    assert not missing, f"public names without a docstring: {missing}"
