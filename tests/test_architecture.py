"""Imports inside the package point one way: no cycles, no private names across modules.

Every ``import``/``from ... import`` of a ``pybivi`` module counts, at module level or inside
a function, except inside a module-level ``__getattr__``: that is how a name that moved
stays reachable from its old module (a lazy re-export), not a dependency of the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pybivi"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """``(imported module, imported name or None)`` for every pybivi import of a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pybivi":
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield (full, None) if full in modules else (target, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pybivi":
                    yield alias.name, None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {m for m, _ in _imports(name, path, modules) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_name_is_imported_from_another_module():
    modules = _modules()
    private = [
        f"{name} imports {target}.{item}"
        for name, path in modules.items()
        for target, item in _imports(name, path, modules)
        if item is not None and item.startswith("_") and not item.startswith("__")
    ]
    assert not private, private


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The scanner itself: a planted cycle and a private import are found."""
    pkg = tmp_path / "pybivi"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pybivi.b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from pybivi import a\n\n_hidden = 1\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    graph = _graph()
    assert "pybivi.b" in graph["pybivi.a"] and "pybivi.a" in graph["pybivi.b"]
    found = [i for n, p in _modules().items() for _, i in _imports(n, p, _modules()) if i]
    assert found == ["_hidden"]


# Layers, top to bottom (the user guide's "Package layout"): a module may import its own
# layer and the layers below it, never one above.
LAYERS = [
    ("pybivi.cli",),
    ("pybivi.report",),
    ("pybivi.pl",),
    ("pybivi.tl",),
    ("pybivi.models", "pybivi.posterior", "pybivi._draws", "pybivi._idata"),
    ("pybivi.training", "pybivi.training_plan", "pybivi.training_data"),
    ("pybivi.module", "pybivi.diagnostics", "pybivi.nn", "pybivi.data", "pybivi.registry",
     "pybivi.storage", "pybivi._covariates", "pybivi._covariate_injection",
     "pybivi._responders", "pybivi._disk_arrays"),
    ("pybivi.distributions",),
    ("pybivi.schemes", "pybivi.datasets", "pybivi.pp"),
    ("pybivi.cme", "pybivi._allocator"),
]


def _layer(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_imports_point_down_the_layers():
    upward = [
        f"{a} -> {b}"
        for a, targets in _graph().items()
        for b in targets
        if _layer(a) is not None and _layer(b) is not None and _layer(b) < _layer(a)
    ]
    assert not upward, upward


def test_every_module_has_a_layer():
    unplaced = [
        m for m in _modules() if m not in ("pybivi", "pybivi._moved") and _layer(m) is None
    ]
    assert not unplaced, unplaced


def test_the_layer_check_sees_an_upward_import():
    assert _layer("pybivi.tl.de") > _layer("pybivi.pl._de")  # tl sits below pl
    graph = {"pybivi.tl.de": {"pybivi.pl"}}
    assert [a for a, t in graph.items() for b in t if _layer(b) < _layer(a)] == ["pybivi.tl.de"]


def test_moved_modules_still_import_with_a_deprecation_warning():
    import importlib
    import sys
    import warnings

    import pybivi
    from pybivi import _moved, pl, report
    from pybivi.tl import de

    sys.modules.pop("pybivi.de_report", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("pybivi.de_report")
        assert old.figure3 is report.figure3
        assert old.plot_overlap is pl.overlap
        assert pybivi.de.kinetic is de.kinetic
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert any("pybivi.de_report moved" in m for m in messages)
    assert any("pybivi.pl.overlap" in m for m in messages)
    for old_name, (places, renamed) in _moved.OLD_MODULES.items():
        for place in places:
            importlib.import_module(place)
        for module, name in renamed.values():
            assert hasattr(importlib.import_module(module), name), (old_name, module, name)
