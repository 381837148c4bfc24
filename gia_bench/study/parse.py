"""Checking a study mapping completely: keys, grid bound, specs, and every training run as the trainer will."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gia_bench.errors import ConfigError, GiaBenchError
from gia_bench.study.schema import (
    DEFAULT_VIEWS,
    MAX_IMAGES,
    MAX_UNITS,
    REQUIRED,
    TOP_KEYS,
    StudyConfig,
    StudyTrain,
    attack_models,
    check_specs,
    fail,
    fewbit,
    int_list,
    parse_train,
    str_list,
)
from gia_bench.threat import VIEWS


def _top_level(raw: Mapping[str, Any], where: Path | str) -> StudyConfig:
    """The top-level keys, typed and range-checked (specs are resolved later, after the grid bound)."""
    for key in raw:
        if key not in TOP_KEYS:
            raise fail(where, key, f"unknown key; accepted: {', '.join(TOP_KEYS)}")
    for key in REQUIRED:
        if key not in raw:
            raise fail(where, key, f"is required ({TOP_KEYS[key]})")
    name = raw.get("name", Path(str(where)).stem)
    if not isinstance(name, str) or not name:
        raise fail(where, "name", f"expected a non-empty string, got {name!r}")
    views = str_list(where, "views", raw.get("views", list(DEFAULT_VIEWS)))
    bad_views = [v for v in views if v not in VIEWS]
    if bad_views:
        raise fail(where, "views", f"{bad_views} not accepted; accepted: {', '.join(VIEWS)}")
    images = raw.get("images", 4)
    if not isinstance(images, int) or isinstance(images, bool) or images < 1:
        raise fail(where, "images", f"expected a positive integer, got {images!r}")
    if images > MAX_IMAGES:
        raise fail(where, "images", f"{images:,} records per cell is more than {MAX_IMAGES:,}")
    data_root = raw.get("data_root")
    if data_root is not None and (not isinstance(data_root, str) or not data_root):
        raise fail(where, "data_root", f"expected a folder (a string), got {data_root!r}")
    train = parse_train(where, raw["train"]) if "train" in raw else None
    if train is not None and data_root is not None and "data_root" not in dict(train.overrides):
        train = dataclasses.replace(train, overrides=tuple(sorted({**dict(train.overrides),
                                                                  "data_root": Path(data_root).expanduser()}.items())))
    model_mode = raw.get("model_mode", "train")
    if model_mode not in ("train", "eval"):
        raise fail(where, "model_mode", f"expected 'train' or 'eval', got {model_mode!r}")
    models, attacks = str_list(where, "models", raw["models"]), str_list(where, "attacks", raw["attacks"])
    return StudyConfig(
        name=name,
        datasets=str_list(where, "datasets", raw["datasets"]),
        models=models,
        defenses=str_list(where, "defenses", raw["defenses"]),
        attacks=attacks,
        attack_models=attack_models(where, raw["attack_models"], attacks, models) if "attack_models" in raw else (),
        views=views,
        batch_sizes=int_list(where, "batch_sizes", raw.get("batch_sizes", [1]), positive=True),
        images=images,
        seeds=int_list(where, "seeds", raw.get("seeds", [0]), positive=False),
        model_mode=model_mode,
        fewbit_backward=fewbit(where, "fewbit_backward", raw.get("fewbit_backward", 0)),
        data_root=None if data_root is None else Path(data_root).expanduser(),
        train=train,
    )


def count_units(config: StudyConfig) -> tuple[int, int]:
    """``(capture cells, units of work)`` of the grid, counted without building any spec."""
    c = config
    per_model = len(c.datasets) * len(c.batch_sizes) * len(c.seeds) * len(c.defenses)
    cells = per_model * len(c.models)
    units = cells + sum(per_model * c.images * len(c.attacks_for(m)) * len(c.views) for m in c.models)
    train = c.train
    if train is not None:
        runs = len(train.defenses or c.defenses) * len(train.run_seeds)
        attacked = len(train.attack_defenses or train.defenses or c.defenses) * len(train.run_seeds)
        attacks = train.attacks or c.attacks_for(train.base.model)
        units += runs + attacked * len(train.attack_steps) * len(attacks) * len(c.views)
    return cells, units


def _check_train(where: Path | str, config: StudyConfig, train: StudyTrain) -> None:
    """Every training run as the trainer will check it, now: specs, attack steps, TrainConfig.validate."""
    from gia_bench.attacks import ATTACKS
    from gia_bench.data import DATASETS
    from gia_bench.defenses import DEFENSES
    from gia_bench.models import MODELS
    from gia_bench.study.plan import TrainJob, train_config, train_records

    trained = train.defenses or config.defenses
    if train.defenses:
        check_specs(where, "train.defenses", train.defenses, DEFENSES, instantiate=True)
    if train.attacks:
        check_specs(where, "train.attacks", train.attacks, ATTACKS, instantiate=True)
    if train.attack_defenses:
        stray = [d for d in train.attack_defenses if d not in set(trained)]
        if stray:
            raise fail(where, "train.attack_defenses", f"{stray} are not trained (train.defenses or defenses)")
    base = train.base
    check_specs(where, "train.dataset", (base.dataset,), DATASETS, instantiate=False)
    check_specs(where, "train.model", (base.model,), MODELS, instantiate=False)
    seed = train.run_seeds[0]
    if train.attack_steps:
        try:  # a step past the run's end is refused now, not after the training
            train_records(TrainJob((train.attack_defenses or trained)[0], seed, train, Path(".")))
        except GiaBenchError as exc:
            raise fail(where, "train.attack_steps", str(exc)) from None
    for defense in trained:
        try:
            train_config(TrainJob(defense, seed, train, Path("."))).validate()
        except GiaBenchError as exc:
            raise fail(where, "train", f"defense {defense!r}: {exc}") from None


def parse_study(raw: Mapping[str, Any], where: Path | str = "<study>") -> StudyConfig:
    """Validate a study mapping (as read from TOML) completely; raise on the first problem."""
    from gia_bench.attacks import ATTACKS
    from gia_bench.data import DATASETS
    from gia_bench.defenses import DEFENSES
    from gia_bench.models import MODELS

    config = _top_level(raw, where)
    cells, units = count_units(config)
    if units > MAX_UNITS:  # before any spec is built: planning costs milliseconds per unit
        raise ConfigError(
            f"{where}: the grid is {units:,} units of work ({cells:,} capture cells x (1 + {config.images} images x"
            f" {len(config.attacks)} attacks x {len(config.views)} views), plus training), more than {MAX_UNITS:,};"
            " split it into several studies"
        )
    check_specs(where, "datasets", config.datasets, DATASETS, instantiate=False)
    check_specs(where, "models", config.models, MODELS, instantiate=False)
    check_specs(where, "defenses", config.defenses, DEFENSES, instantiate=True)
    check_specs(where, "attacks", config.attacks, ATTACKS, instantiate=True)
    if config.train is not None:
        _check_train(where, config, config.train)
    return config
