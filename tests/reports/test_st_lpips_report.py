"""Reports show ST-LPIPS where LPIPS has no trunk weights, labelled so, and read results written before it."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
from report_fixture import originals, write_result

from gia_bench.metrics import get_st_lpips
from gia_bench.reports import ReportOptions, make_report


def _two_results(root: Path) -> tuple[Path, Path]:
    """Two results of one setting: one scored with ST-LPIPS, one as written before the metric registry."""
    gen = torch.Generator().manual_seed(0)
    orig = originals(gen)
    labels = torch.arange(orig.shape[0])
    common = dict(dataset="photos", model="lenet", defense="none", attack="dlg:iterations=300", view="naive",
                  nbytes=1000, bytes_fp32=1000)  # fmt: skip
    new = write_result(root / "a", gen, orig, labels, 0.1, record_id="r0", record="r0.safetensors", **common)
    old = write_result(root / "b", gen, orig, labels, 0.2, record_id="r1", record="r1.safetensors", extra={"schema": 1},
                       **common)  # fmt: skip
    data = json.loads(old.read_text())
    for im in data["metrics"]["images"]:
        del im["ms_ssim"], im["st_lpips"]
    del data["metrics"]["unavailable"], data["metrics"]["notes"]
    old.write_text(json.dumps(data))
    return new, old


def _summary(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "summary.csv").open()))


def test_reports_show_st_lpips_when_lpips_has_no_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no LPIPS trunk anywhere
    monkeypatch.delenv("GIA_BENCH_LPIPS_WEIGHTS", raising=False)
    new, old = _two_results(tmp_path / "runs")
    stored = [im["st_lpips"] for im in json.loads(new.read_text())["scores"]["images"]]
    assert all(v > 0 for v in stored)

    # the old result lacks ST-LPIPS and nothing may be computed: the setting has no ST-LPIPS value
    make_report(ReportOptions(runs=(tmp_path / "runs",), out=tmp_path / "off", compute_lpips=False))
    (row,) = _summary(tmp_path / "off")
    assert row["st_lpips_mean"] == "" and row["lpips_mean"] == ""
    images = list(csv.DictReader((tmp_path / "off" / "results.csv").open()))
    assert [float(r["st_lpips"]) for r in images if r["record_id"] == "r0"] == pytest.approx(stored)

    # computing what results lack fills the old one from its stored images
    out = make_report(ReportOptions(runs=(tmp_path / "runs",), out=tmp_path / "on"))
    (row,) = _summary(tmp_path / "on")
    rec_old = json.loads(old.read_text())
    from safetensors.torch import load_file

    t = load_file(str(old.parent / "reconstruction.safetensors"))
    filled = [float(v) for v in get_st_lpips("alex")(t["reconstruction"], t["original"])]
    assert len(filled) == rec_old["batch_size"]
    assert float(row["st_lpips_mean"]) == pytest.approx(statistics.fmean(stored + filled), rel=1e-6)
    assert row["lpips_mean"] == ""
    md = (tmp_path / "on" / "report.md").read_text()
    assert "| SSIM | PSNR dB | ST-LPIPS | labels |" in md and "| LPIPS |" not in md
    page = (tmp_path / "on" / "report.html").read_text()
    assert ">ST-LPIPS</th>" in page and ">LPIPS</th>" not in page
    assert any("LPIPS unavailable" in n for n in out.data.lpips_notes)
