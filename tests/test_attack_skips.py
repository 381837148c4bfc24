"""An attack that refuses a record is a skip with its reason, not a failed unit (issue 26).

``analytic --view aware`` refuses a QSGD record (nothing is sent exactly) and reads a
PowerSGD rank-1 record at B = 1. A study with both finishes with no failure, keeps the
refusal where the result would be, does not rerun it when resumed, and its report lists it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gia_bench.attack_skips import SKIP_FILE, skip_is_current
from gia_bench.events import Recorded
from gia_bench.study import StudyOptions, prepare, run_study

STUDY = """
name = "skips"
datasets = ["digits"]
models = ["mlp:hidden=32"]
images = 1
defenses = ["qsgd", "powersgd:rank=1"]
attacks = ["analytic"]
views = ["aware"]
"""


def _skips(out: Path) -> list[Path]:
    return sorted(out.rglob(SKIP_FILE))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study run once: its source file, its folder and its status."""
    root = tmp_path_factory.mktemp("skips")
    src = root / "skips.toml"
    src.write_text(STUDY)
    out = root / "out"
    return src, out, run_study(prepare(src, out), out)


def test_a_refused_attack_is_a_done_unit_with_its_reason_and_the_report_lists_it(study):
    src, out, status = study
    assert status.failures == () and status.attacks == (2, 2)
    (skip,) = _skips(out)
    data = json.loads(skip.read_text())
    assert "sends no tensor exactly" in data["reason"] and data["view"] == "aware"
    assert not (skip.parent / "result.json").exists()
    assert len(list(out.rglob("result.json"))) == 1  # powersgd:rank=1 was attacked
    md = (out / "report" / "report.md").read_text()
    assert "refused" in md and "sends no tensor exactly" in md
    # resumed: nothing left to run, the refusal is not attempted again
    again = run_study(prepare(src, out), out, StudyOptions())
    assert again.failures == () and sum(again.ran.values()) == 0


def test_a_skip_is_current_only_for_the_record_it_refused(study, tmp_path):
    _, out, _ = study
    (original,) = _skips(out)
    skip = tmp_path / SKIP_FILE  # a copy: the forgery below must not touch the shared study
    skip.write_bytes(original.read_bytes())
    record = Path(json.loads(skip.read_text())["record"])
    assert skip_is_current(skip, record, "analytic", "aware", 0)
    assert not skip_is_current(skip, record, "analytic", "naive", 0)  # another view is another unit
    other = sorted(p for p in out.rglob("*.safetensors") if "records" in p.parts and p != record
                   and not p.name.endswith("truth.safetensors"))  # fmt: skip
    assert other and not skip_is_current(skip, other[0], "analytic", "aware", 0)  # another record's content
    forged = json.loads(skip.read_text())
    forged["kind"] = "attack_result"
    skip.write_text(json.dumps(forged))
    assert not skip_is_current(skip, record, "analytic", "aware", 0)


def test_the_attack_grid_goes_on_past_a_refusal(tmp_path):
    from gia_bench.capture import CaptureConfig, capture
    from gia_bench.evaluate import AttackOptions, run_attacks

    paths = capture(CaptureConfig("digits", "mlp:hidden=32", "qsgd", 1, 1, 0, tmp_path / "rec"))
    seen = Recorded()
    results = run_attacks([paths[0]], ["analytic"], ["aware", "naive"], AttackOptions(out=tmp_path / "runs"), seen)
    assert [r.view for r in results] == ["naive"]
    skips = [c for c in seen.calls if c[0] == "skip"]
    assert len(skips) == 1 and "sends no tensor exactly" in skips[0][2]
