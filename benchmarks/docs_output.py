"""Put a benchmark's printed output into the documentation, as printed.

Every script in ``benchmarks/`` runs its ``main`` through :func:`run`. With ``--docs`` (or
``--docs NAME``) on the command line, everything the script prints is also written to
``docs/benchmarks/NAME.md`` (default NAME: the script's name): the command that was run, the
machine (cores, load average before and after) and the output in a text block.
``docs/benchmarks.md`` includes these files, so the figures on that page are the scripts'
own output and a rerun refreshes them. Without ``--docs`` nothing is written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _pop_docs_argument(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--docs [NAME]`` and the NAME ('' for the default), or None."""
    out, name, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--docs":
            name = ""
            if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                name = argv[i + 1]
                i += 1
        elif arg.startswith("--docs="):
            name = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    return out, name


def _command(script: Path, args: list[str]) -> str:
    """The command line as run from the repository root (or from benchmarks/)."""
    names = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    env = " ".join(f"{k}={os.environ[k]}" for k in names if k in os.environ)
    cwd = Path.cwd().resolve()
    if cwd == script.parent:
        line = f"cd benchmarks && {env + ' ' if env else ''}../.venv/bin/python {script.name}"
    else:
        line = f"{env + ' ' if env else ''}.venv/bin/python benchmarks/{script.name}"
    return " ".join([line, *map(shlex.quote, args)])


def _machine() -> str:
    try:
        load = "load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    except OSError:
        load = "load average unknown"
    return f"{os.cpu_count()} CPU cores, {load}"


def write(name: str, command: str, output: str, before: str, after: str) -> Path:
    """Write one benchmark's documentation fragment; returns its path."""
    DOCS.mkdir(parents=True, exist_ok=True)
    path = DOCS / f"{name}.md"
    day = _dt.date.today().isoformat()
    path.write_text(
        f"<!-- written by `{command} --docs`; rerun it to refresh this file -->\n\n"
        f"```bash\n{command}\n```\n\n"
        f"Run on {day}: {before} at the start, {after.split(', ', 1)[1]} at the end.\n\n"
        f"```text\n{output.rstrip()}\n```\n"
    )
    return path


def run(main: Callable[[], object]) -> object:
    """Run a benchmark's ``main``, also writing its output to the docs when ``--docs`` is given."""
    script = Path(sys.modules["__main__"].__file__).resolve()
    argv, name = _pop_docs_argument(sys.argv[1:])
    if name is None:
        return main()
    sys.argv[1:] = argv
    buffer = io.StringIO()
    before = _machine()
    with contextlib.redirect_stdout(_Tee(sys.stdout, buffer)):
        result = main()
    path = write(name or script.stem, _command(script, argv), buffer.getvalue(), before, _machine())
    print(f"wrote {path}")
    return result
