"""A default attack scores every registered metric that needs no downloads: ST-LPIPS and MS-SSIM included."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import make_record, pick

from gia_bench.evaluate import evaluate
from gia_bench.records import truth_path


def test_a_default_attack_writes_finite_st_lpips_and_ms_ssim(tmp_path: Path) -> None:
    record, truth = make_record("lenet", "photos", pick("photos", (3, 6)))
    path = record.save(tmp_path / f"{record.record_id}.safetensors")
    truth.save(truth_path(path))
    result = json.loads(evaluate(path, "dlg:iterations=2", "naive", tmp_path / "runs").path.read_text())
    values = {name: [im[name] for im in result["scores"]["images"]] for name in ("st_lpips", "ms_ssim")}
    for name, column in values.items():  # keyed by the METRICS name, per image
        assert len(column) == 2 and all(math.isfinite(v) for v in column), column
    assert all(0.0 <= v <= 1.0 for v in values["ms_ssim"]) and all(v > 0 for v in values["st_lpips"])
    assert "st_lpips" not in result["scores"]["unavailable"]  # computed offline, from the wheel's weights
