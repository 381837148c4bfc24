"""``study run --out DIR`` (issue 29): a new, empty or study folder is used; any other folder is refused.

A study writes records, runs and a report into ``DIR``; into a folder of the user's own
files it would write beside them. Like ``train --out``, it refuses: one line, exit 2,
nothing written. A study folder is one that holds the pinned ``study.toml``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gia_bench.errors import ConfigError
from gia_bench.study import STUDY_FILE, StudyOptions, prepare, run_study

REPO = Path(__file__).parents[1]
TINY = """
name = "tiny"
datasets = ["digits"]
models = ["lenet"]
images = 1
defenses = ["none"]
attacks = ["dlg:iterations=1"]
views = ["naive"]
"""


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else b"/" for p in root.rglob("*")}


def _study_run(study: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "gia_bench", "study", "run", str(study), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_cli_refuses_a_folder_of_other_files_in_one_line_and_writes_nothing(tmp_path):
    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes\n")
    (out / "photos" / "a.png").write_bytes(b"\x89PNG")
    before = _tree(out)
    proc = _study_run(study, out)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(out) in lines[0] and "not a study folder" in lines[0] and "Traceback" not in proc.stderr
    assert _tree(out) == before  # no study.toml, records or report beside the user's files


def test_a_file_as_out_is_refused(tmp_path):
    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    out = tmp_path / "results.csv"
    out.write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"results\.csv: is a file, not a study folder"):
        prepare(study, out)
    assert out.read_text() == "a,b\n"


@pytest.mark.parametrize("exists", [False, True])
def test_new_and_empty_folders_become_study_folders(tmp_path, exists):
    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    out = tmp_path / "out"
    if exists:
        out.mkdir()
    prepare(study, out)
    assert (out / STUDY_FILE).read_text() == TINY
    prepare(study, out)  # and a rerun resumes it: the folder is a study folder now


def test_an_existing_study_folder_is_resumed_not_refused(tmp_path):
    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    out = tmp_path / "out"
    first = run_study(prepare(study, out), out, StudyOptions(workers=1, report=False))
    assert first.attacks == (1, 1) and dict(first.ran) == {"capture": 1, "attack": 1}
    # the folder is full of the study's own files now: a rerun resumes it, and redoes nothing
    again = run_study(prepare(study, out), out, StudyOptions(workers=1, report=False))
    assert again.attacks == (1, 1) and again.failures == () and sum(again.ran.values()) == 0
