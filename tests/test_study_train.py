"""A study's training run with attack_steps: one run gives leakage per step, accuracy and bytes.

Two gloo workers train a tiny MLP; the trainer saves rank 0's messages at steps 0 and 5,
the study's attacks run on those records, each result names its step and source, and the
report has the step table and the leakage-vs-step figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gia_bench.errors import ConfigError
from gia_bench.study import StudyOptions, load_study, prepare, run_study, status

STUDY = """
name = "steps"
datasets = ["digits:size=8,channels=1"]
models = ["mlp:hidden=16"]
images = 1
defenses = ["topk:ratio=0.2"]
attacks = ["dlg:iterations=2"]
views = ["naive", "aware"]

[train]
dataset = "digits:size=8,channels=1"
model = "mlp:hidden=16"
epochs = 1
batch_size = 4
nproc_per_node = 2
attack_steps = [0, 5]
"""


def test_study_attacks_a_training_run_at_its_steps(tmp_path):
    (tmp_path / "s.toml").write_text(STUDY)
    out = tmp_path / "out"
    config = prepare(tmp_path / "s.toml", out)
    assert config.train is not None and config.train.attack_steps == (0, 5) and config.train.base.lr is None
    st = run_study(config, out, StudyOptions(workers=1))
    assert st.failures == ()
    assert st.trains == (1, 1) and st.attacks == (2 + 4, 2 + 4)  # capture's record + 2 steps, x 2 views
    records = sorted(p.name for p in (out / "train" / "topk_ratio-0.2" / "records").glob("step*[0-9].safetensors"))
    assert records == ["step0000000.safetensors", "step0000005.safetensors"]
    results = [json.loads(p.read_text()) for p in out.glob("runs/*/*/*/*/result.json")]
    by_source = {(r["source"], r["step"], r["view"]) for r in results}
    assert by_source == {
        ("capture", 0, "naive"), ("capture", 0, "aware"),
        ("train", 0, "naive"), ("train", 0, "aware"), ("train", 5, "naive"), ("train", 5, "aware"),
    }  # fmt: skip
    metrics = json.loads((out / "train" / "topk_ratio-0.2" / "metrics.json").read_text())
    assert metrics["lr"]["peak"] == pytest.approx(0.1 * 8 / 256)
    assert set(metrics["records"]) == {"0", "5"} and metrics["epochs"][0]["test_examples"] == 359
    assert status(out).attacks == (6, 6)
    # content-keyed layout: a group per run (like a capture group), then defense, record id, attack-view
    group = out / "runs" / "train-digits_size-8_channels-1-mlp_hidden-16-b4-s0" / "topk_ratio-0.2"
    assert sorted(p.relative_to(group).as_posix() for p in group.glob("*/*/result.json")) == [
        f"step000000{s}/dlg_iterations-2-{v}/result.json" for s in (0, 5) for v in ("aware", "naive")
    ]
    train_results = [r for r in results if r["source"] == "train"]
    assert all(Path(r["record"]).parent == out / "train" / "topk_ratio-0.2" / "records" for r in train_results)
    # a rerun finds every unit done: nothing is trained or attacked again
    again = run_study(config, out, StudyOptions(workers=1, report=False))
    assert sum(again.ran.values()) == 0 and again.attacks == (6, 6) and again.trains == (1, 1)
    # the report: the step table (accuracy at each attacked step) and the leakage-vs-step figure
    assert list((out / "report").rglob("steps-*.png"))
    assert "test acc. at step" in (out / "report" / "report.md").read_text()
    # one summary row per (source, step, view): the run's step-0 record is not merged with the capture's
    import csv

    summary = list(csv.DictReader((out / "report" / "summary.csv").open()))
    assert sorted((r["source"], r["step"], r["view"]) for r in summary) == sorted((s, str(n), v) for s, n, v in by_source)


def test_attack_steps_are_checked_before_anything_runs(tmp_path):
    bad = STUDY.replace("attack_steps = [0, 5]", "attack_steps = [0, 5000]")
    (tmp_path / "s.toml").write_text(bad)
    with pytest.raises(ConfigError, match=r"train\.attack_steps.*only \d+ optimizer steps"):
        load_study(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text(STUDY.replace("attack_steps = [0, 5]", 'attack_steps = [0, "last"]'))
    with pytest.raises(ConfigError, match=r"train\.attack_steps"):
        load_study(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text(STUDY.replace("nproc_per_node = 2", "nproc_per_node = 2\nlr = -1"))
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_study(Path(tmp_path / "s.toml"))
    (tmp_path / "s.toml").write_text(STUDY + 'attack_defenses = ["none"]\n')
    with pytest.raises(ConfigError, match=r"train\.attack_defenses.*not trained"):
        load_study(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text(STUDY + 'attacks = ["ig:iterations=0"]\n')
    with pytest.raises(ConfigError, match=r"train\.attacks"):
        load_study(tmp_path / "s.toml")
    (tmp_path / "s.toml").write_text(STUDY + 'attacks = ["ig:iterations=3"]\nattack_defenses = ["topk:ratio=0.2"]\n')
    plan = load_study(tmp_path / "s.toml").train
    assert plan.attacks == ("ig:iterations=3",) and plan.attack_defenses == ("topk:ratio=0.2",)
