"""Untrusted text (record ids, specs, threat lines) cannot become a spreadsheet formula or markup (issue 11, item 4)."""

from __future__ import annotations

import csv
import html
import io
import json
import re
from pathlib import Path

import pytest
from report_fixture import write_fixture

from gia_bench.reports import ReportOptions, make_report
from gia_bench.reports.tables import csv_text
from gia_bench.reports.writers import md_text

SCRIPT = "<script>alert(1)</script>"
IMG = '<img src=x onerror="alert(1)">'


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """The fixture's results with formulas and markup put into their ids, specs and threat lines."""
    root = tmp_path_factory.mktemp("hostile")
    written = write_fixture(root)
    for n, path in enumerate(p for p in written["results"] if "d0" in p.parts):
        data = json.loads(path.read_text())
        data["record_id"] = "=1+1" if n % 2 == 0 else f"rec{SCRIPT}"
        data["dataset"] = "@SUM(A1:A9)"
        data["defense"] = f"+evil{IMG}"
        # two attacks stay two (one attack string for both would make them one identity, two contents)
        data["attack"] = f"-2+3{SCRIPT}[click](javascript:alert(1)) {data['attack'].split(':')[0]}"
        data["threat"] = {"labels": f"\tHYPERLINK {SCRIPT}", "note": "\r=cmd|' /C calc'!A0"}
        path.write_text(json.dumps(data))
    out = root / "out"
    make_report(ReportOptions(runs=(root / "runs",), out=out, train=(root / "train",), compute_lpips=False))
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_csv_text_follows_the_owasp_rule() -> None:
    for bad in ("=1+1", "+1", "-1+2", "@SUM(A1)", "\t=1", "\r=1"):
        assert csv_text(bad) == "'" + bad
    for fine in ("none", "topk:ratio=0.01", "1=1", " =1", ""):
        assert csv_text(fine) == fine


def test_csv_cells_are_not_formulas(hostile: Path) -> None:
    images = _csv(hostile / "results.csv")
    summary = _csv(hostile / "summary.csv")
    assert "'=1+1" in {r["record_id"] for r in images}
    assert "=1+1" not in {r["record_id"] for r in images}
    for rows in (images, summary):
        hostile_rows = [r for r in rows if r["dataset"] != "photos"]
        assert hostile_rows
        for r in hostile_rows:
            assert r["dataset"] == "'@SUM(A1:A9)"
            assert r["defense"] == f"'+evil{IMG}"
            assert r["attack"].startswith("'-2+3")
    threats = {r["threat"] for r in summary if r["dataset"] != "photos"}
    assert threats and all(not t.startswith(("=", "+", "-", "@", "\t", "\r")) for t in threats)
    # numbers stay numbers: no quote in front of a negative or positive value
    for r in images:
        float(r["ssim"]), float(r["psnr"]), float(r["final_loss"])
    # and no cell of either file starts with a formula character
    for path in (hostile / "results.csv", hostile / "summary.csv"):
        for row in csv.reader(io.StringIO(path.read_text())):
            for cell in row:
                if cell[:1] in ("=", "+", "@", "\t", "\r"):
                    pytest.fail(f"{path.name}: cell {cell!r} starts a formula")
                if cell.startswith("-"):
                    float(cell)  # only numbers may start with a minus


def test_markdown_is_inert(hostile: Path) -> None:
    md = (hostile / "report.md").read_text()
    assert "<script" not in md.lower()
    assert not re.search(r"<img[^>]*onerror", md, flags=re.IGNORECASE)
    assert not re.search(r"(?<!\\)\]\(javascript:", md)  # the brackets are escaped: no link
    # the text is still there for the reader, as text
    assert "&lt;script&gt;alert\\(1\\)&lt;/script&gt;" in md or "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert md_text("@SUM(A1:A9)") in md
    # the only HTML tags in the document are the ones the writer puts there itself
    tags = set(re.findall(r"</?([a-zA-Z]+)", md))
    assert tags <= {"details", "summary", "code", "br", "sub"}, tags


def test_html_is_inert(hostile: Path) -> None:
    page = (hostile / "report.html").read_text()
    body = page.split("<script>\n// Self-check", 1)[0]  # the report's own self-check script is the only script
    assert "<script" not in body.lower()
    assert not re.search(r"<img[^>]*onerror", page, flags=re.IGNORECASE)
    assert html.escape(SCRIPT, quote=False) in page or html.escape(SCRIPT) in page


def test_md_text_escapes_markdown_and_html() -> None:
    assert md_text("warm_start=true") == "warm\\_start=true"  # renders with its underscore
    assert md_text("a|b") == "a\\|b"  # cannot split a table cell
    assert md_text("[x](y)") == "\\[x\\](y)"  # cannot make a link
    assert md_text("<b>&") == "&lt;b&gt;&amp;"
    assert md_text("two\nlines") == "two lines"  # cannot end a table row
