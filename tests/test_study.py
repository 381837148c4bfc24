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
    assert {a.split(":")[0] for a in config.attacks} == {"dlg", "ig"}
    assert set(config.views) == {"naive", "aware"} and set(config.datasets) == {"digits", "faces"}
    assert config.train is not None
