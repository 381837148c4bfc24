"""A study resumes by result identity: an attack unit is done only when its result is of the record now there (issue 30)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from gia_bench.records import TRUTH_SUFFIX, truth_path
from gia_bench.study import StudyOptions, prepare, run_study, status

ONE = """
name = "one"
datasets = ["digits"]
models = ["lenet"]
images = 1
defenses = ["none"]
attacks = ["dlg:iterations=1"]
views = ["naive", "aware"]
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_replaced_record_has_its_attacks_redone_and_a_plain_resume_redoes_nothing(tmp_path):
    from gia_bench.capture import CaptureConfig, capture

    (tmp_path / "study.toml").write_text(ONE)
    out = tmp_path / "out"
    config = prepare(tmp_path / "study.toml", out)
    options = StudyOptions(workers=1, report=False)
    first = run_study(config, out, options)
    assert first.attacks == (2, 2) and first.failures == () and first.ran["attack"] == 2
    (record,) = [p for p in out.glob("records/*/*/*.safetensors") if not p.name.endswith(TRUTH_SUFFIX)]
    results = sorted(out.glob("runs/**/result.json"))
    assert len(results) == 2
    stamps = [p.stat().st_mtime_ns for p in results]

    # positive control: a plain resume finds both results current and runs nothing
    again = run_study(config, out, options)
    assert again.attacks == (2, 2) and again.ran.get("attack", 0) == 0 and again.ran.get("capture", 0) == 0
    assert [p.stat().st_mtime_ns for p in results] == stamps

    # the record is replaced by another with the same id and defense (captured with another seed)
    other = capture(CaptureConfig("digits", "lenet", "none", 1, 1, 7, tmp_path / "other"))[0]
    assert other.name == record.name and _sha(other) != _sha(record)
    old_sha = _sha(record)
    shutil.copyfile(other, record)
    shutil.copyfile(truth_path(other), truth_path(record))
    assert status(out, config).attacks == (0, 2)  # `study show` no longer counts the stale results

    resumed = run_study(config, out, options)
    assert resumed.ran["attack"] == 2 and resumed.ran.get("capture", 0) == 0 and resumed.failures == ()
    assert resumed.attacks == (2, 2)
    for path in results:
        data = json.loads(path.read_text())
        assert data["record_sha256"] == _sha(record) == _sha(other) != old_sha
        assert data["record"] == str(record)
