"""``gia-bench report``'s table off a terminal: every header, name and verdict whole on its line."""

from __future__ import annotations

from pathlib import Path

from report_fixture import write_fixture
from typer.testing import CliRunner

from gia_bench.cli import app
from gia_bench.reports.terminal import HEADERS


def test_report_table_in_a_log_keeps_each_row_on_one_line(tmp_path: Path) -> None:
    write_fixture(tmp_path)
    res = CliRunner().invoke(
        app,
        ["report", str(tmp_path / "runs"), "--train", str(tmp_path / "train"), "--out", str(tmp_path / "o"), "--no-lpips"],
        env={"COLUMNS": None},
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    header = next(line for line in lines if "defense" in line and "┃" in line)
    assert all(h in header for h in HEADERS)  # at 80 columns they were folded over six lines
    rows = [line for line in lines if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["none", "qsgd", "topk"]  # one line per defense
    # a verdict is a sentence with numbers in it: not broken across lines
    assert any("too few images to tell (4/4 beat the floor, p = 0.062, level 0.013)" in r for r in rows)
    assert any("Too few images:" in line and "their worst case" in line for line in lines)
    assert any(line.startswith("12 result(s)") and str(tmp_path / "o" / "report.html") in line for line in lines)
