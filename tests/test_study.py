import dataclasses
import json
from pathlib import Path

import pytest

from gia_bench import study as study_mod
from gia_bench.errors import ConfigError
from gia_bench.study import StudyOptions, load_study, prepare, run_study, status

TINY = """
name = "tiny"
datasets = ["digits"]
models = ["lenet"]
images = 1
defenses = ["none", "topk:ratio=0.05"]
attacks = ["dlg:iterations=2"]
views = ["naive", "aware"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_tiny_study_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    config = prepare(_write(tmp_path, TINY), out)
    st = run_study(config, out, StudyOptions(workers=1))
    assert st.captures == (2, 2) and st.attacks == (4, 4) and st.trains == (0, 0)
    assert st.failures == ()
    results = sorted(out.glob("runs/*/*/*/*/result.json"))
    assert len(results) == 4
    seen = {(json.loads(p.read_text())["defense"].split(":")[0], json.loads(p.read_text())["view"]) for p in results}
    assert seen == {("none", "naive"), ("none", "aware"), ("topk", "naive"), ("topk", "aware")}
    html = (out / "report" / "report.html").read_text()
    assert "topk" in html and "none" in html
    assert status(out).attacks == (4, 4)


def test_interrupted_study_resumes_without_redoing(tmp_path, monkeypatch):
    import gia_bench.evaluate as runner

    out = tmp_path / "out"
    config = prepare(_write(tmp_path, TINY), out)
    real = runner.run_attack
    calls: list[tuple] = []

    def interrupted_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((str(args[0]), args[1], args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_attack", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, out, StudyOptions(workers=1, report=False))
    assert status(out, config).attacks == (2, 4)

    def counting(*args, **kwargs):
        calls.append((str(args[0]), args[1], args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_attack", counting)
    st = run_study(config, out, StudyOptions(workers=1, report=False))
    assert st.attacks == (4, 4)
    assert len(calls) == 4 and len(set(calls)) == 4  # every unit ran exactly once over both runs


@pytest.mark.parametrize(
    "edit, words",
    [
        ('defenses = ["nosuch"]', ["defenses", "nosuch", "accepted"]),
        ('defenses = ["topk:ratio=abc"]', ["defenses", "ratio", "number"]),
        ('views = ["sideways"]', ["views", "sideways", "naive, aware"]),
        ("images = 0", ["images", "positive"]),
        ('colour = "red"', ["colour", "unknown key", "accepted"]),
        ('attacks = ["dlg:bogus=1"]', ["attacks", "bogus"]),
        ("[train]\nepochs = -1", ["train.epochs", ">= 1"]),
        ("[train]\nspeed = 3", ["train.speed", "unknown key"]),
    ],
)
def test_bad_study_file_is_rejected_before_running(tmp_path, edit, words):
    lines = [line for line in TINY.strip().splitlines() if not line.startswith(edit.split(" ")[0] + " ")]
    path = _write(tmp_path, "\n".join(lines) + "\n" + edit + "\n")
    with pytest.raises(ConfigError) as info:
        load_study(path)
    for w in words:
        assert w in str(info.value)


def test_missing_required_key_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="'attacks': is required"):
        load_study(_write(tmp_path, 'datasets = ["digits"]\nmodels = ["lenet"]\ndefenses = ["none"]\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_study(_write(tmp_path, "datasets = [\n"))


def test_out_folder_holds_one_study(tmp_path):
    out = tmp_path / "out"
    prepare(_write(tmp_path, TINY), out)
    other = tmp_path / "other.toml"
    other.write_text(TINY.replace('"none", ', ""))
    with pytest.raises(ConfigError, match="holds another study"):
        prepare(other, out)


def test_demo_study_is_valid_and_covers_the_issue():
    config = load_study(study_mod.DEMO_STUDY)
    families = {d.split(":")[0] for d in config.defenses}
    assert {"none", "topk", "qsgd", "signsgd", "powersgd", "lqsgd"} <= families
    assert {a.split(":")[0] for a in config.attacks} & {"feature", "analytic"}  # a structure-aware attacker (issue 25)
    assert "naive" in set(config.views) and set(config.datasets) == {"digits", "faces"}
    assert config.train is not None


def test_fewbit_backward_key_reaches_captures_and_training(tmp_path):
    """Issue 16: ``fewbit_backward`` applies to the study's captures (top level) and to its
    training runs (``[train]``); every record's model description says so."""
    from gia_bench.records import read_meta

    text = TINY.replace('defenses = ["none", "topk:ratio=0.05"]', 'defenses = ["none"]').replace(
        'views = ["naive", "aware"]', 'views = ["naive"]'
    ).replace("dlg:iterations=2", "dlg:iterations=1")
    out = tmp_path / "out"
    config = prepare(_write(tmp_path, text + "fewbit_backward = 4\n\n[train]\nfewbit_backward = 3\n"), out)
    assert config.fewbit_backward == 4 and config.train.base.fewbit_backward == 3
    train = study_mod.train_jobs(config, out)
    assert [study_mod.train_config(job).fewbit_backward for job in train] == [3]
    assert load_study(_write(tmp_path, text)).fewbit_backward == 0  # omitted: exact backward
    captures = [u for u in study_mod.plan_units(config, out) if u.kind == "capture"]
    assert [u.args["config"].fewbit_backward for u in captures] == [4]  # the unit carries its CaptureConfig
    # run the captures and their attack (not the training: the test_train suites cover the trainer's flag)
    no_train = dataclasses.replace(config, train=None)
    st = run_study(no_train, out, StudyOptions(workers=1, report=False))
    assert st.captures == (1, 1) and st.attacks == (1, 1) and st.failures == ()
    records = [p for p in sorted(out.glob("records/*/*/*.safetensors")) if not p.name.endswith(".truth.safetensors")]
    assert len(records) == 1
    assert read_meta(records[0]).model.fewbit_backward == 4


@pytest.mark.parametrize("value", ["9", "-1", "true", '"4"', "2.5"])
@pytest.mark.parametrize("table", ["", "[train]\n"])
def test_bad_fewbit_backward_exits_2_with_one_line(tmp_path, value, table):
    import subprocess
    import sys

    path = _write(tmp_path, TINY + f"\n{table}fewbit_backward = {value}\n")
    with pytest.raises(ConfigError, match="fewbit_backward.*0 \\(exact backward\\) or 1..8 bits"):
        load_study(path)
    if value != "9" or table:
        return  # one subprocess is enough for the CLI's side (the same ConfigError path for both tables)
    proc = subprocess.run(
        [sys.executable, "-m", "gia_bench", "study", "run", str(path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'fewbit_backward'" in lines[0] and "got 9" in lines[0], proc.stderr
    assert not (tmp_path / "out" / "records").exists()
