"""Hostile values for data-set and model parameters, study grids and ``[train]``, and ``federated``:
each is one error line (CLI exit 2, no traceback) before any work starts."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gia_bench.cli import app
from gia_bench.data import DATASETS, load_dataset
from gia_bench.errors import ConfigError, SpecError
from gia_bench.federated import MAX_CLIENTS, FederatedConfig
from gia_bench.models import MODELS
from gia_bench.registry import Range, describe_params, param_ranges
from gia_bench.study import MAX_IMAGES, MAX_UNITS, parse_study


def _cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        app(args, prog_name="gia-bench")
    return int(exc.value.code or 0)


# -- parameter ranges ----------------------------------------------------------------------------


def test_range_contains():
    r = Range(8, 128)
    assert 8 in r and 128 in r and 32.5 in r
    assert 7 not in r and 129 not in r and math.nan not in r and math.inf not in r and True not in r
    assert -1e300 in Range(None, 0) and 1e300 in Range(0, None) and str(Range(8, 128)) == "[8, 128]"


def test_digits_size_100000_is_one_line_naming_the_range(tmp_path, capsys):
    with pytest.raises(SpecError, match=r"dataset 'digits' parameter 'size': 100000 is outside its range \[8, 128\]"):
        load_dataset("digits:size=100000")
    assert _cli(["capture", "--dataset", "digits:size=100000", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "'size': 100000 is outside its range [8, 128]" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_photos_grid_times_size_bounded():
    with pytest.raises(SpecError, match="more than 1024"):
        DATASETS.create("photos:grid=16,size=128")
    DATASETS.create("photos:grid=4,size=256")


def test_an_override_is_checked_too():
    with pytest.raises(SpecError, match="'size'"):
        DATASETS.create("digits", size=4)


_RANGED = [(registry, name, key, bounds) for registry in (DATASETS, MODELS) for name, cls in registry.items()
           for key, bounds in param_ranges(cls).items()]


def test_every_built_in_size_and_width_has_a_range():
    ranged = {(r.kind, n, k) for r, n, k, _ in _RANGED}
    for name in ("digits", "faces", "photos", "cifar10", "cifar100", "mnist", "fashionmnist", "imagefolder"):
        assert ("dataset", name, "size") in ranged
    assert {("model", "convnet", "width"), ("model", "mlp", "hidden"), ("model", "mlp", "depth"),
            ("model", "lenet", "init_range")} <= ranged
    # and `gia-bench list` shows it
    assert "range [8, 128]" in next(p.help for p in describe_params(DATASETS.get("digits")) if p.name == "size")


@settings(max_examples=60, deadline=None)
@given(entry=st.sampled_from(_RANGED), offset=st.integers(1, 10**9), side=st.booleans())
def test_values_outside_a_range_are_refused_inside_accepted(entry, offset, side):
    registry, name, key, bounds = entry
    value = bounds.hi + offset if side else bounds.lo - offset
    with pytest.raises(SpecError, match=rf"parameter '{key}': .* is outside its range"):
        registry.kwargs_for(f"{name}:{key}={value}")
    registry.kwargs_for(f"{name}:{key}={bounds.lo}")
    registry.kwargs_for(f"{name}:{key}={bounds.hi}")


@pytest.mark.parametrize("spec", ["lenet:init_range=nan", "lenet:init_range=inf", "convnet:width=0",
                                  "convnet:width=100000", "mlp:hidden=1000000", "mlp:depth=1000"])
def test_model_parameters_refused(spec):
    with pytest.raises(SpecError, match="outside its range"):
        MODELS.kwargs_for(spec)


# -- study grids and [train] ---------------------------------------------------------------------

BASE = {"datasets": ["digits"], "models": ["lenet"], "defenses": ["none"], "attacks": ["dlg:iterations=1"]}


def test_images_bounded():
    with pytest.raises(ConfigError, match=rf"key 'images': 1,000,000 records per cell is more than {MAX_IMAGES:,}"):
        parse_study({**BASE, "images": 10**6})


def test_a_million_cells_refused_before_any_spec_is_built():
    # the defenses do not exist: the grid bound answers first, so no spec was resolved (nor anything planned)
    raw = {**BASE, "defenses": [f"nosuch{i}" for i in range(1000)], "seeds": list(range(1000))}
    with pytest.raises(ConfigError, match=rf"1,000,000 capture cells .* more than {MAX_UNITS:,}"):
        parse_study(raw)


def test_grid_at_the_bound_is_accepted():
    parse_study({**BASE, "images": MAX_IMAGES, "views": ["naive"]})


@pytest.mark.parametrize("key, value, fragment", [
    ("lr", math.inf, "train.lr': expected a finite number > 0"),
    ("lr", -1.0, "train.lr"),
    ("weight_decay", math.nan, "train.weight_decay': expected a finite number"),
    ("weight_decay", math.inf, "train.weight_decay': expected a finite number"),
    ("weight_decay", -0.1, "--weight-decay must be a finite number >= 0"),
    ("momentum", 1.5, "--momentum must be in [0, 1)"),
    ("momentum", math.nan, "train.momentum': expected a finite number"),
    ("epochs", True, "train.epochs': expected int, got True"),
    ("batch_size", False, "train.batch_size': expected int"),
    ("nproc_per_node", 0, "train.nproc_per_node': must be >= 1"),
    ("epochs", 2.5, "train.epochs': expected int"),
    ("dataset", "digits:size=100000", "outside its range"),
])
def test_train_table_checked_in_full_at_parse_time(key, value, fragment):
    with pytest.raises(ConfigError) as exc:
        parse_study({**BASE, "train": {key: value}})
    assert fragment in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_bad_train_value_stops_the_cli_before_any_capture(tmp_path, capsys):
    study = tmp_path / "s.toml"
    study.write_text('datasets = ["digits"]\nmodels = ["lenet"]\ndefenses = ["none"]\nattacks = ["dlg"]\n'
                     "[train]\nlr = inf\n")
    assert _cli(["study", "run", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_train_config_validate_refuses_non_finite():
    from gia_bench.train import TrainConfig

    for kwargs, flag in [({"lr": math.inf}, "--lr"), ({"weight_decay": math.nan}, "--weight-decay"),
                         ({"epochs": True}, "--epochs")]:
        with pytest.raises(ConfigError, match=flag):
            TrainConfig(out=Path("unused"), **kwargs).validate()


# -- federated -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, fragment", [
    ({"seed": -1}, "--seed must be an integer in [0, "),
    ({"num_cpus": 0}, "--num-cpus must be an integer in [1, "),
    ({"num_cpus": -1}, "--num-cpus must be an integer in [1, "),
    ({"num_cpus": (os.cpu_count() or 1) + 1}, "--num-cpus"),
    ({"cpus_per_client": 1e9}, "--cpus-per-client must be in [0.01, "),
    ({"cpus_per_client": 0.0}, "--cpus-per-client"),
    ({"cpus_per_client": math.nan}, "--cpus-per-client"),
    ({"num_cpus": 1, "cpus_per_client": 2.0}, "--cpus-per-client must be in [0.01, 1]"),
    ({"clients": 0}, "--clients"),
    ({"clients": MAX_CLIENTS + 1}, "--clients"),
    ({"rounds": 0}, "--rounds"),
    ({"local_steps": 10_000, "local_batch": 1, "capture_rounds": (1,)}, "simulated examples per update"),
])
def test_federated_config_refused(kwargs, fragment, tmp_path):
    with pytest.raises(SpecError) as exc:
        FederatedConfig(out=tmp_path / "run", **kwargs).check()
    assert fragment in str(exc.value), str(exc.value)
    assert not (tmp_path / "run").exists()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(max_value=-1))
def test_federated_negative_seeds_refused(seed):
    with pytest.raises(SpecError, match="--seed"):
        FederatedConfig(seed=seed, out="unused").check()


def test_federated_defaults_pass(tmp_path):
    FederatedConfig(out=tmp_path / "run").check()
    FederatedConfig(out=tmp_path / "run", num_cpus=1, cpus_per_client=0.5, capture_rounds=(1,)).check()


@pytest.mark.parametrize("args, fragment", [
    (["--seed", "-1"], "--seed"),
    (["--num-cpus", "0"], "--num-cpus"),
    (["--num-cpus", "-1"], "--num-cpus"),
    (["--cpus-per-client", "1e9"], "--cpus-per-client"),
])
def test_federated_cli_refuses_before_starting(args, fragment, tmp_path, capsys):
    pytest.importorskip("flwr")
    out = tmp_path / "run"
    assert _cli(["federated", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not out.exists()
