"""benchmarks/readme_demo.py: the README's demo block comes from the demo's own output, through the report's code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from test_decides import SPELLINGS, _write

from gia_bench.reports import build_report, headline, load_runs
from gia_bench.reports.headline import summary_sentence

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "readme_demo.py"
TIME_LOG = """\tCommand being timed: "gia-bench demo --out demo"
\tUser time (seconds): 1010.50
\tElapsed (wall clock) time (h:mm:ss or m:ss): 9:41.27
\tMaximum resident set size (kbytes): 1523400
"""


@pytest.fixture(scope="module")
def readme_demo():
    spec = importlib.util.spec_from_file_location("readme_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_time_log_is_read(readme_demo, tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text(TIME_LOG)
    assert readme_demo.time_figures(tmp_path / "t.txt") == ("9 min 41 s", "1.52 GB")


def test_block_says_what_the_report_says(readme_demo, tmp_path: Path) -> None:
    _write(tmp_path)  # a study folder: runs/ and the pinned study.toml
    (tmp_path / "t.txt").write_text(TIME_LOG)
    text = readme_demo.block(tmp_path, tmp_path / "t.txt", SCRIPT.parents[1])
    heads = headline(build_report(load_runs([tmp_path / "runs"]), None, tuple(SPELLINGS)))
    assert summary_sentence(heads) in text
    assert "**9 min 41 s wall**" in text and "commit `" in text and "cores" in text and "OMP_NUM_THREADS" in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(h.rows) for h in heads)
    leak = next(line for line in rows if line.startswith("| `topk:ratio=0.1` "))
    assert "leaks (8/8" in leak and "`dlg` aware" in leak
