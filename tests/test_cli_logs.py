"""Off a terminal (a log file, CI) the CLI keeps every name and spec whole on its line.

The commands run through typer's CliRunner, whose stdout is not a terminal; without
:mod:`gia_bench.cli.console` rich laid them out for 80 columns (``powersg…``, a spec cut in two).
The audit battery and the trainer are replaced by their results: what is tested is the printing.
"""

from __future__ import annotations


import pytest
from typer.testing import CliRunner

from gia_bench.audit import AuditResult, Standing
from gia_bench.cli import app
from gia_bench.contract import CheckResult

LONG = "powersgd:rank=2,start_iter=10,min_compression_rate=2.0,use_error_feedback=true,warm_start=true"
NO_COLUMNS = {"COLUMNS": None}  # a COLUMNS of the caller's terminal would fix the width


def _line_with(output: str, text: str) -> str:
    lines = [line for line in output.splitlines() if text in line]
    assert lines, f"{text!r} is not whole on any line of:\n{output}"
    return lines[0]


def test_audit_names_every_defense_in_full(tmp_path, monkeypatch):
    standings = tuple(
        Standing(name, 1000.0 * (i + 1), 0.9, 0.5, 20.0, 0.3, True, audited=i == 0)
        for i, name in enumerate(("toy_compressors:Identity", LONG, "lqsgd:rank=1,bits=8"))
    )
    result = AuditResult(
        spec="toy_compressors:Identity",
        checks=(CheckResult("decode(encode(g)) has the gradient's shapes", True),),
        standings=standings,
    )
    monkeypatch.setattr("gia_bench.audit.run_audit", lambda *args, **kwargs: result)
    res = CliRunner().invoke(app, ["audit", "toy_compressors:Identity", "--out", str(tmp_path)], env=NO_COLUMNS)
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if line.startswith("│") and "," in line]
    for s in standings:
        row = _line_with("\n".join(rows), s.defense)
        assert f"{s.bytes:,.0f}" in row and "yes" in row  # the whole row on one line
    assert "…" not in res.output
    _line_with(res.output, "decode(encode(g)) has the gradient's shapes")


def test_train_summary_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / ("a-run-folder-with-a-long-name-" * 3)

    def fake_launch(config, **kwargs):
        return {
            "defense": config.defense, "world_size": 2,
            "totals": {"final_test_accuracy": 0.9312, "bytes_sent_per_worker": 123_456_789, "bytes_per_step": 4321.0,
                       "seconds": 12.5},
        }  # fmt: skip

    monkeypatch.setattr("gia_bench.train.launch", fake_launch)
    res = CliRunner().invoke(app, ["train", "--out", str(out), "--defense", LONG, "--model", "mlp"], env=NO_COLUMNS)
    assert res.exit_code == 0, res.output
    line = _line_with(res.output, LONG)
    assert "93.12%" in line and "123,456,789 bytes" in line and str(out / "metrics.json") in line


@pytest.mark.parametrize("stderr", [False, True])
def test_a_log_console_is_wide_and_a_terminal_keeps_its_width(stderr, monkeypatch):
    import io

    from gia_bench.cli.console import LOG_WIDTH, make_console

    monkeypatch.delenv("COLUMNS", raising=False)
    log = make_console(stderr=stderr, file=io.StringIO())
    assert log.width == LOG_WIDTH
    text = "x" * 300
    log.print(text)
    assert log.file.getvalue() == text + "\n"
    term = make_console(stderr=stderr, file=io.StringIO(), force_terminal=True, width=90)
    assert term.width == 90
    fixed = make_console(stderr=stderr, file=io.StringIO(), width=70)  # an explicit width stands anywhere
    assert fixed.width == 70


def test_attack_lines_keep_the_defense_and_the_result_path(tmp_path):
    runner = CliRunner()
    records = tmp_path / ("records-in-a-folder-with-a-long-name-" * 2)
    res = runner.invoke(app, ["capture", "--dataset", "digits", "--model", "lenet", "--defense", "topk:ratio=0.5",
                              "--num", "1", "--out", str(records)], env=NO_COLUMNS)  # fmt: skip
    assert res.exit_code == 0, res.output
    _line_with(res.output, "defense topk:ratio=0.5, model lenet, dataset digits, seed 0")
    res = runner.invoke(app, ["attack", str(records), "-a", "dlg:iterations=1", "-o", str(tmp_path / "runs")],
                        env=NO_COLUMNS)
    assert res.exit_code == 0, res.output
    line = _line_with(res.output, "[topk] dlg (naive): 1 it")  # "[topk]" was read as markup and vanished
    result = next((tmp_path / "runs").rglob("result.json"))
    assert line.endswith(f"-> {result}")
