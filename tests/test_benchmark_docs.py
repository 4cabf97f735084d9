"""The benchmark page shows the scripts' own output: the mechanism, and that it is wired up."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import docs_output  # noqa: E402

HELPERS = {"docs_output.py", "approximator_common.py", "kinetic_diagnostics.py"}


def test_every_benchmark_script_can_write_its_output_into_the_docs():
    scripts = sorted(p for p in BENCHMARKS.glob("*.py") if p.name not in HELPERS)
    assert scripts
    missing = [p.name for p in scripts if "docs_output.run(main)" not in p.read_text()]
    assert not missing, missing


def test_docs_flag_writes_the_printed_output_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(docs_output, "DOCS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--n", "3", "--docs", "fragment"])
    seen = {}

    def main():
        seen["argv"] = list(sys.argv[1:])
        print("ratio 1.25")
        return 0

    assert docs_output.run(main) == 0
    assert seen["argv"] == ["--n", "3"]  # the script never sees --docs
    text = (tmp_path / "fragment.md").read_text()
    assert "ratio 1.25" in text
    command = re.search(r"```bash\n(.*)\n```", text).group(1)
    assert command.endswith("--n 3") and "--docs" not in command


def test_without_the_flag_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(docs_output, "DOCS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--n", "3"])
    docs_output.run(lambda: print("x"))
    assert not list(tmp_path.iterdir())


def test_the_page_includes_every_written_fragment_and_nothing_missing():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    included = set(re.findall(r"```\{include\} benchmarks/([\w.-]+\.md)", page))
    written = {p.name for p in (ROOT / "docs" / "benchmarks").glob("*.md")}
    assert included == written, (included - written, written - included)
