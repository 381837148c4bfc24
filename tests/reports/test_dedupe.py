"""The report counts each result once, by identity (record sha256, attack, view, seed, schema), never by file (issue 30)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from report_fixture import write_fixture
from typer.testing import CliRunner

from gia_bench.cli import app
from gia_bench.evaluate import evaluate
from gia_bench.identity import ResultConflictError
from gia_bench.reports import load_runs

SPEC = "dlg:iterations=1"
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two records (ids 0000 and 0001) attacked into ``o1``; record 0000 attacked again into ``o2``."""
    from gia_bench.capture import CaptureConfig, capture

    root = tmp_path_factory.mktemp("dedupe")
    a, b = capture(CaptureConfig("digits", "lenet", "none", 1, 2, 0, root / "records"))
    ra = evaluate(a, SPEC, "naive", root / "o1")
    rb = evaluate(b, SPEC, "naive", root / "o1")
    again = evaluate(a, SPEC, "naive", root / "o2")
    return {"root": root, "a": a, "b": b, "ra": ra.path, "rb": rb.path, "again": again.path}


def _copy(result: Path, runs: dict[str, Path], folder: str) -> Path:
    """``result``'s folder copied to the same place under ``folder`` (a sibling of o1)."""
    rel = result.parent.relative_to(runs["root"] / "o1")
    dest = runs["root"] / folder / rel
    shutil.copytree(result.parent, dest, dirs_exist_ok=True)
    return dest / "result.json"


def _edit(path: Path, psnr: float | None = None, **fields) -> None:
    """Set ``fields``; ``psnr`` replaces the first image's PSNR (a different measurement)."""
    data = json.loads(path.read_text())
    data.update(fields)
    if psnr is not None:
        data["scores"]["images"][0]["psnr"] = psnr
    path.write_text(json.dumps(data))


def _report(tmp_path: Path, *folders: Path):
    return CliRunner().invoke(app, ["report", *map(str, folders), "--out", str(tmp_path / "report"), "--no-lpips"])


def _images(tmp_path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((tmp_path / "report" / "results.csv").read_text())))


def test_one_folder_counts_each_result_once(runs, tmp_path):
    """Positive control: nothing repeated, nothing left out."""
    loaded = load_runs([runs["root"] / "o1"])
    assert sorted(r.path for r in loaded.results) == sorted([runs["ra"], runs["rb"]]) and loaded.skipped == ()
    res = _report(tmp_path, runs["root"] / "o1")
    assert res.exit_code == 0, res.output
    assert "2 result(s)" in res.output and len(_images(tmp_path)) == 2  # one image per record


def test_report_a_a_counts_once(runs, tmp_path):
    o1 = runs["root"] / "o1"
    loaded = load_runs([o1, o1, runs["ra"]])  # the folder twice, and a file inside it
    assert len(loaded.results) == 2 and loaded.skipped == ()
    res = _report(tmp_path, o1, o1)
    assert res.exit_code == 0 and "2 result(s)" in res.output, res.output
    assert len(_images(tmp_path)) == 2


def test_one_record_attacked_into_two_folders_counts_as_one_image(runs, tmp_path):
    loaded = load_runs([runs["root"] / "o1", runs["root"] / "o2"])
    assert sorted(r.path for r in loaded.results) == sorted([runs["ra"], runs["rb"]])
    (note,) = loaded.skipped
    assert note.path == runs["again"] and str(runs["ra"]) in note.reason and "counted once" in note.reason
    res = _report(tmp_path, runs["root"] / "o1", runs["root"] / "o2")
    assert res.exit_code == 0 and "2 result(s)" in res.output, res.output
    rows = _images(tmp_path)
    assert sorted(r["record_id"] for r in rows) == ["digits-lenet-0000", "digits-lenet-0001"]


def test_a_result_its_record_contradicts_is_not_counted(runs):
    """A result.json claiming another record's sha256 (its own record file hashes otherwise) is left out, named."""
    sha_a = hashlib.sha256(runs["a"].read_bytes()).hexdigest()
    forged = _copy(runs["rb"], runs, "forged")
    _edit(forged, record_sha256=sha_a, psnr=99.0)  # B's result, now claiming A's content
    loaded = load_runs([runs["root"] / "o1", runs["root"] / "forged"])
    assert sorted(r.path for r in loaded.results) == sorted([runs["ra"], runs["rb"]])
    (note,) = loaded.skipped
    assert note.path == forged and str(runs["b"]) in note.reason and "not counted" in note.reason
    assert sha_a[:12] in note.reason
    alone = load_runs([runs["root"] / "forged"])
    assert alone.results == () and [s.path for s in alone.skipped] == [forged]


def test_two_results_of_one_identity_with_different_content_are_refused(runs, tmp_path):
    other = _copy(runs["ra"], runs, "other")
    _edit(other, psnr=99.0, seconds=1.0)
    with pytest.raises(ResultConflictError) as info:
        load_runs([runs["root"] / "o1", runs["root"] / "other"])
    assert str(runs["ra"]) in str(info.value) and str(other) in str(info.value)
    # the command: one line naming both files, exit 2, no traceback
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "4000"}
    proc = subprocess.run(
        [sys.executable, "-m", "gia_bench", "report", str(runs["root"] / "o1"), str(runs["root"] / "other"),
         "--out", str(tmp_path / "r"), "--no-lpips"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(runs["ra"]) in lines[0] and str(other) in lines[0] and "different content" in lines[0]


def test_the_fixture_counts_are_unchanged(tmp_path):
    """Positive control: results without a record sha256 (older files) still count one each."""
    written = write_fixture(tmp_path)
    loaded = load_runs([tmp_path / "runs"])
    assert len(loaded.results) == len(written["results"])
    assert sorted(s.path for s in loaded.skipped) == sorted(written["malformed"])
