"""The study's [train] table as overrides of TrainConfig, [train] seeds, data_root, and built-in study names."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from gia_bench.errors import ConfigError
from gia_bench.study import (
    STUDIES_DIR,
    builtin_studies,
    load_study,
    parse_study,
    plan_units,
    resolve_study,
    train_config,
    train_jobs,
)
from gia_bench.train import TrainConfig

BASE = {"datasets": ["digits"], "models": ["lenet"], "defenses": ["none", "lqsgd:rank=1"], "attacks": ["dlg"]}


def test_omitted_train_keys_take_the_trainers_defaults_and_given_ones_override_them():
    config = parse_study({**BASE, "train": {"model": "convnet:width=8", "lr_schedule": "constant", "lr": 0.05}})
    assert config.train is not None
    base = config.train.base
    default = TrainConfig(out=Path("."))
    # omitted: exactly TrainConfig's defaults (one source of defaults, no study-side copy)
    assert (base.weight_decay, base.nproc_per_node, base.epochs, base.batch_size, base.momentum) == (
        default.weight_decay, default.nproc_per_node, default.epochs, default.batch_size, default.momentum)
    assert (base.model, base.lr_schedule, base.lr) == ("convnet:width=8", "constant", 0.05)
    job = train_jobs(config, Path("out"))[1]
    run = train_config(job)
    assert (run.defense, run.out, run.model, run.lr_schedule, run.weight_decay) == (
        "lqsgd:rank=1", Path("out/train/lqsgd_rank-1"), "convnet:width=8", "constant", default.weight_decay)


@pytest.mark.parametrize("key, value, fragment", [
    ("out", "x", "'train.out': unknown key (the study sets it)"),
    ("defense", "none", "'train.defense': unknown key (the study sets it)"),
    ("capture_steps", [0], "'train.capture_steps': unknown key (the study sets it)"),
    ("lr_schedule", "linear", "'train.lr_schedule': expected one of 'constant', 'cosine', got 'linear'"),
    ("data_root", 3, "'train.data_root': expected a path"),
    ("download", 1, "'train.download': expected bool, got 1"),
    ("capture_ranks", [0, "1"], "'train.capture_ranks': expected a list of integers"),
    ("lr_warmup_steps", -1, "--lr-warmup-steps must be >= 0"),
    ("seeds", [0, 0], "'train.seeds': has duplicates"),
    ("nosuch", 1, "'train.nosuch': unknown key; accepted: dataset, model"),
])  # fmt: skip
def test_train_overrides_are_typed_as_trainconfig_fields(key, value, fragment):
    with pytest.raises(ConfigError) as exc:
        parse_study({**BASE, "train": {key: value}})
    assert fragment in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_seed_and_seeds_together_are_refused():
    with pytest.raises(ConfigError, match="train.seeds': give either seed or seeds"):
        parse_study({**BASE, "train": {"seed": 1, "seeds": [0, 1]}})


def test_train_seeds_give_one_run_per_defense_and_seed_in_its_own_folder():
    config = parse_study({**BASE, "train": {"seeds": [3, 5], "model": "mlp:hidden=8"}})
    jobs = train_jobs(config, Path("o"))
    assert [(j.defense, j.seed, j.out.as_posix()) for j in jobs] == [
        ("none", 3, "o/train/none/s3"), ("none", 5, "o/train/none/s5"),
        ("lqsgd:rank=1", 3, "o/train/lqsgd_rank-1/s3"), ("lqsgd:rank=1", 5, "o/train/lqsgd_rank-1/s5"),
    ]  # fmt: skip
    assert [train_config(j).seed for j in jobs] == [3, 5, 3, 5]
    units = [u for u in plan_units(config, Path("o")) if u.kind == "train"]
    assert len({u.key for u in units}) == 4 and [dict(u.label)["seed"] for u in units] == ["3", "5", "3", "5"]
    # one seed (the default): the folder keeps the layout of earlier studies
    single = train_jobs(parse_study({**BASE, "train": {"seed": 7}}), Path("o"))
    assert [(j.seed, j.out.as_posix()) for j in single] == [(7, "o/train/none"), (7, "o/train/lqsgd_rank-1")]


def test_units_are_typed_functions_that_pickle_by_reference(tmp_path):
    """A unit crosses to a worker process (or a Ray task) by pickle: its function must come back the same."""
    from gia_bench.capture import CaptureConfig
    from gia_bench.study import units

    config = parse_study({**BASE, "data_root": "~/data", "train": {"model": "mlp:hidden=8"}})
    planned = plan_units(config, tmp_path)
    fns = {u.kind: u.fn for u in planned}
    assert fns == {"capture": units.capture_unit, "attack": units.attack_unit, "train": units.train_unit}
    capture = next(u for u in planned if u.kind == "capture")
    cfg = capture.args["config"]
    assert isinstance(cfg, CaptureConfig) and cfg.data_root == Path("~/data").expanduser()
    assert not cfg.out.is_absolute()  # relative to the study folder: the unit writes under its staging folder
    back = pickle.loads(pickle.dumps(planned))
    assert back == planned and back[0].fn is units.capture_unit
    # the top-level data_root reaches the training runs too, unless [train] sets its own
    assert train_config(train_jobs(config, tmp_path)[0]).data_root == Path("~/data").expanduser()
    own = parse_study({**BASE, "data_root": "a", "train": {"data_root": "b"}})
    assert train_config(train_jobs(own, tmp_path)[0]).data_root == Path("b")


def test_builtin_study_names_resolve_and_a_file_path_wins(tmp_path, monkeypatch):
    assert {"demo", "lqsgd-paper", "lqsgd-paper-cifar10"} <= set(builtin_studies())
    for name in ("lqsgd-paper", "lqsgd-paper.toml"):
        assert resolve_study(name) == STUDIES_DIR / "lqsgd-paper.toml"
        assert load_study(name).name == "lqsgd-paper"
    monkeypatch.chdir(tmp_path)
    Path("lqsgd-paper.toml").write_text('name = "mine"\n' + "\n".join(f"{k} = {v!r}".replace("'", '"')
                                                                    for k, v in BASE.items()))
    assert load_study("lqsgd-paper.toml").name == "mine"  # a file in the working folder is the user's
    with pytest.raises(ConfigError, match="no such study file .*built-in studies: .*lqsgd-paper"):
        load_study("nosuch")


def test_attack_models_runs_an_attack_on_the_named_models_only():
    from gia_bench.study.parse import count_units

    raw = {**BASE, "models": ["lenet", "mlp:hidden=8"], "attacks": ["dlg", "analytic"], "images": 2,
           "attack_models": {"analytic": ["mlp:hidden=8"]}, "train": {"model": "lenet", "attack_steps": [0]}}
    config = parse_study(raw)
    assert config.attacks_for("lenet") == ("dlg",) and config.attacks_for("mlp:hidden=8") == ("dlg", "analytic")
    planned = plan_units(config, Path("o"))
    attacks = [(u.args["job"].attack, u.args["job"].record) for u in planned if u.kind == "attack"]
    on = {(a, "lenet" if "-lenet-" in r else "mlp") for a, r in attacks if r.startswith("records/")}
    assert on == {("dlg", "lenet"), ("dlg", "mlp"), ("analytic", "mlp")}
    # 2 models x 2 defenses cells; records: 2 x 2 x 2 x dlg + 2 x 2 x analytic (mlp), x 2 views; the
    # training runs' records (lenet) get dlg only
    assert count_units(config)[1] == len(planned)
    assert sum(1 for a, r in attacks if a.startswith("analytic")) == 2 * 2 * 2  # mlp: 2 defenses x 2 records x 2 views
    trained = [a for a, r in attacks if r.startswith("train/")]
    assert trained and set(trained) == {"dlg"}


@pytest.mark.parametrize("value,fragment", [
    ({"tag": ["lenet"]}, "is not one of attacks"),
    ({"dlg": ["resnet18"]}, "not in models"),
    ({"dlg": []}, "expected a non-empty"),
    ({}, "expected a table"),
    (["dlg"], "expected a table"),
])
def test_attack_models_is_checked_against_attacks_and_models(value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_study({**BASE, "attack_models": value})
