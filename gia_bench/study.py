"""Studies: a TOML file -> the grid of captures, attacks and trainings -> one report.

A study file names the data, models, batch sizes, number of images, seeds, the
defense specs, the attack specs and views, and optionally training runs for the
accuracy column::

    name = "my-study"
    datasets = ["digits", "faces"]
    models = ["lenet"]
    batch_sizes = [1]
    images = 4                 # records (batches) per dataset x model x batch size x seed
    seeds = [0]
    defenses = ["none", "topk:ratio=0.01", "lqsgd:rank=1"]
    attacks = ["dlg:iterations=50", "ig:iterations=300"]
    views = ["naive", "aware"]
    fewbit_backward = 4        # optional: captures with Few-Bit Backward activations (0: exact)

    [train]                    # optional: accuracy, bytes and leakage along real DDP training
    dataset = "digits"
    model = "convnet:width=16"
    epochs = 2
    batch_size = 8             # per worker; also the batch the attacks at attack_steps face
    nproc_per_node = 2         # lr: omitted -> 0.1 x global batch / 256 (the trainer's rule)
    attack_steps = [0, 50, "end"]   # optimizer steps whose rank-0 messages the attacks target
    fewbit_backward = 4        # optional: train with Few-Bit Backward activations (0: exact)

``fewbit_backward`` (bits 1..8, 0 or omitted: exact backward; :mod:`gia_bench.fewbit`) is
``--fewbit-backward`` of ``capture`` (top level) and ``train`` (in ``[train]``): the
models' pointwise nonlinearities keep a b-bit code and back-propagate the optimal
piecewise-constant derivative, and every record says so in its model description.

The file is checked completely before anything runs: an unknown key, a value of
the wrong type or a spec that does not resolve raises :class:`ConfigError` naming
the key and what is accepted. The grid is bounded (``images`` <= :data:`MAX_IMAGES`,
at most :data:`MAX_UNITS` units), the ``[train]`` table is checked as the
:class:`~gia_bench.train.TrainConfig` of every run it starts (finite ``lr`` and
``weight_decay``, integer ``epochs``, ...), and before the first unit runs, every attack
on every cell must fit ``--max-memory`` (:mod:`gia_bench.budget`).

On disk (``DIR``)::

    DIR/study.toml                                   the study as run
    DIR/records/<dataset>-<model>-b<B>-s<seed>/<defense>/<id>.safetensors (+ .truth)
    DIR/runs/<dataset>-<model>-b<B>-s<seed>/<defense>/<record id>/<attack>-<view>/result.json
    DIR/train/<defense>/metrics.json                 (+ records/step0000050.safetensors at attack_steps)
    DIR/runs/train-<dataset>-<model>-b<B>-s<seed>/<defense>/step0000050/<attack>-<view>/result.json
    DIR/report/                                      report.html, report.md, CSVs, figures
    DIR/.staging/                                    units in flight (their files move out when finished)

A unit of work is finished when its output file exists (outputs are written
atomically), so a rerun skips it: studies resume after Ctrl-C or a crash.
:func:`plan_units` turns the grid into units (an attack depends on the capture, or the
training run, that writes its record) and :func:`run_study` hands them to an engine
(:mod:`gia_bench.engines`: ``local`` or ``ray``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gia_bench.budget import DEFAULT_MAX_MEMORY
from gia_bench.errors import ConfigError, GiaBenchError
from gia_bench.events import SILENT, Events
from gia_bench.io import slug as io_slug
from gia_bench.threat import VIEWS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Views a study runs when it names none (``oracle``, an upper bound, only when asked for).
DEFAULT_VIEWS = ("naive", "aware")
#: The built-in study that ``gia-bench demo`` runs.
DEMO_STUDY = Path(__file__).parent / "studies" / "demo.toml"
#: Records per capture cell (``images``) and units of work per study (captures, attacks,
#: trainings, attacks on trainings): a grid past them is refused before anything is planned.
#: Planning costs ~1 ms per unit (20,000 in 22 s on 2 busy cores), running one a process
#: start or more; the demo has 183.
MAX_IMAGES = 1000
MAX_UNITS = 20_000


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """Training runs (one per defense): the accuracy and wire-bytes columns, and records along the run.

    ``lr`` None takes the trainer's rule (0.1 x global batch / 256, linear warm-up; see
    :func:`gia_bench.train.default_lr`). ``attack_steps``: optimizer steps (0-based;
    ``"end"``: the last one) at which the trainer saves rank 0's messages as records; the
    study's attacks and views run on them, so leakage, accuracy and bytes come from one run.
    ``attacks`` (default: the study's) and ``attack_defenses`` (default: every trained
    defense) narrow what runs on those records: a BatchNorm model's batch is costlier to
    attack than a one-image LeNet record.
    """

    dataset: str = "digits"
    model: str = "lenet"
    epochs: int = 2
    batch_size: int = 64
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    nproc_per_node: int = 2
    seed: int = 0
    defenses: tuple[str, ...] | None = None  # None: the study's defenses
    attack_steps: tuple[int | str, ...] = ()
    attacks: tuple[str, ...] | None = None  # attacks on the training records; None: the study's
    attack_defenses: tuple[str, ...] | None = None  # runs whose records are attacked; None: all
    fewbit_backward: int = 0  # bits of Few-Bit Backward activations in training (0: exact)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A parsed, validated study file."""

    name: str
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    defenses: tuple[str, ...]
    attacks: tuple[str, ...]
    views: tuple[str, ...] = DEFAULT_VIEWS
    batch_sizes: tuple[int, ...] = (1,)
    images: int = 4
    seeds: tuple[int, ...] = (0,)
    model_mode: str = "train"
    fewbit_backward: int = 0  # bits of Few-Bit Backward activations in the captures (0: exact)
    train: TrainPlan | None = None


_TOP_KEYS: dict[str, str] = {
    "name": "string",
    "datasets": "list of dataset specs",
    "models": "list of model specs",
    "defenses": "list of defense specs",
    "attacks": "list of attack specs",
    "views": "list of 'naive' / 'aware' / 'oracle'",
    "batch_sizes": "list of positive integers",
    "images": "positive integer",
    "seeds": "list of integers",
    "model_mode": "'train' or 'eval'",
    "fewbit_backward": "integer 0 (exact backward) or 1..8 bits",
    "train": "table",
}
_REQUIRED = ("datasets", "models", "defenses", "attacks")


def slug(spec: str) -> str:
    """A readable, filesystem-safe name for a spec string (``topk:ratio=0.01`` -> ``topk_ratio-0.01``)."""
    text = spec.replace(":", "_", 1).replace(":", "_").replace(",", "_").replace("=", "-")
    return io_slug(text, runs=False)


def _fail(where: Path | str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: key '{key}': {message}")


def _str_list(where: Path | str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(where, key, f"expected a non-empty {_TOP_KEYS.get(key, 'list of strings')}, got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(where, key, f"has duplicates: {value!r}")
    return tuple(v.strip() for v in value)


def _int_list(where: Path | str, key: str, value: Any, positive: bool) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    ok = isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or (positive and min(value) < 1):
        kind = "positive integers" if positive else "integers"
        raise _fail(where, key, f"expected a non-empty list of {kind}, got {value!r}")
    return tuple(value)


def _fewbit(where: Path | str, key: str, value: Any) -> int:
    """Bits of Few-Bit Backward (gia_bench.fewbit): 0 (exact) or 1..8, as ``--fewbit-backward``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 8:
        raise _fail(where, key, f"expected an integer 0 (exact backward) or 1..8 bits, got {value!r}")
    return value


def _check_specs(where: Path | str, key: str, specs: tuple[str, ...], registry: Any, instantiate: bool) -> None:
    for spec in specs:
        try:
            if instantiate:
                registry.create(spec)
            else:
                registry.kwargs_for(spec)
        except GiaBenchError as exc:
            raise _fail(where, key, f"{spec!r}: {exc}") from None


def _parse_train(where: Path | str, raw: Any) -> TrainPlan:
    if not isinstance(raw, dict):
        raise _fail(where, "train", f"expected a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(TrainPlan)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise _fail(where, f"train.{key}", f"unknown key; accepted: {', '.join(fields)}")
        default = fields[key].default
        if key in ("defenses", "attacks", "attack_defenses"):
            kwargs[key] = _str_list(where, f"train.{key}", value)
        elif key == "attack_steps":
            kwargs[key] = _attack_steps(where, value)
        elif key == "fewbit_backward":
            kwargs[key] = _fewbit(where, "train.fewbit_backward", value)
        elif key == "lr":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise _fail(where, "train.lr", f"expected a finite number > 0 (omit it for 0.1 x global batch / 256),"
                            f" got {value!r}")
            kwargs[key] = float(value)
        elif isinstance(value, bool) or not isinstance(value, type(default)) and not (  # TOML true is not 1
            isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)
        ):
            raise _fail(where, f"train.{key}", f"expected {type(default).__name__}, got {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise _fail(where, f"train.{key}", f"expected a finite number, got {value!r}")
        else:
            kwargs[key] = type(default)(value)
    plan = TrainPlan(**kwargs)
    for key in ("epochs", "batch_size", "nproc_per_node"):
        if getattr(plan, key) < 1:
            raise _fail(where, f"train.{key}", f"must be >= 1, got {getattr(plan, key)}")
    return plan


def _attack_steps(where: Path | str, value: Any) -> tuple[int | str, ...]:
    """``[0, 50, "end"]``: distinct optimizer steps >= 0, or ``"end"`` (the run's last step)."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]
    ok = isinstance(value, list) and all(
        (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or v == "end" for v in value
    )
    if not ok or len(set(value)) != len(value):
        raise _fail(where, "train.attack_steps", f'expected distinct optimizer steps >= 0 or "end", got {value!r}')
    return tuple(value)


def parse_study(raw: Mapping[str, Any], where: Path | str = "<study>") -> StudyConfig:
    """Validate a study mapping (as read from TOML) completely; raise on the first problem."""
    from gia_bench.attacks import ATTACKS
    from gia_bench.data import DATASETS
    from gia_bench.defenses import DEFENSES
    from gia_bench.models import MODELS

    for key in raw:
        if key not in _TOP_KEYS:
            raise _fail(where, key, f"unknown key; accepted: {', '.join(_TOP_KEYS)}")
    for key in _REQUIRED:
        if key not in raw:
            raise _fail(where, key, f"is required ({_TOP_KEYS[key]})")
    name = raw.get("name", Path(str(where)).stem)
    if not isinstance(name, str) or not name:
        raise _fail(where, "name", f"expected a non-empty string, got {name!r}")
    datasets = _str_list(where, "datasets", raw["datasets"])
    models = _str_list(where, "models", raw["models"])
    defenses = _str_list(where, "defenses", raw["defenses"])
    attacks = _str_list(where, "attacks", raw["attacks"])
    views = _str_list(where, "views", raw.get("views", list(DEFAULT_VIEWS)))
    bad_views = [v for v in views if v not in VIEWS]
    if bad_views:
        raise _fail(where, "views", f"{bad_views} not accepted; accepted: {', '.join(VIEWS)}")
    batch_sizes = _int_list(where, "batch_sizes", raw.get("batch_sizes", [1]), positive=True)
    seeds = _int_list(where, "seeds", raw.get("seeds", [0]), positive=False)
    images = raw.get("images", 4)
    if not isinstance(images, int) or isinstance(images, bool) or images < 1:
        raise _fail(where, "images", f"expected a positive integer, got {images!r}")
    model_mode = raw.get("model_mode", "train")
    if model_mode not in ("train", "eval"):
        raise _fail(where, "model_mode", f"expected 'train' or 'eval', got {model_mode!r}")
    fewbit_backward = _fewbit(where, "fewbit_backward", raw.get("fewbit_backward", 0))
    if images > MAX_IMAGES:
        raise _fail(where, "images", f"{images:,} records per cell is more than {MAX_IMAGES:,}")
    train = _parse_train(where, raw["train"]) if "train" in raw else None
    cells = len(datasets) * len(models) * len(batch_sizes) * len(seeds) * len(defenses)
    units = cells * (1 + images * len(attacks) * len(views))
    if train is not None:
        attacked = len(train.attack_defenses or train.defenses or defenses)
        units += len(train.defenses or defenses) + attacked * len(train.attack_steps) * len(
            train.attacks or attacks) * len(views)
    if units > MAX_UNITS:  # before any spec is built: planning costs milliseconds per unit
        raise ConfigError(
            f"{where}: the grid is {units:,} units of work ({cells:,} capture cells x (1 + {images} images x"
            f" {len(attacks)} attacks x {len(views)} views), plus training), more than {MAX_UNITS:,};"
            " split it into several studies"
        )
    _check_specs(where, "datasets", datasets, DATASETS, instantiate=False)
    _check_specs(where, "models", models, MODELS, instantiate=False)
    _check_specs(where, "defenses", defenses, DEFENSES, instantiate=True)
    _check_specs(where, "attacks", attacks, ATTACKS, instantiate=True)
    if train is not None:
        _check_specs(where, "train.dataset", (train.dataset,), DATASETS, instantiate=False)
        _check_specs(where, "train.model", (train.model,), MODELS, instantiate=False)
        if train.defenses:
            _check_specs(where, "train.defenses", train.defenses, DEFENSES, instantiate=True)
        if train.attacks:
            _check_specs(where, "train.attacks", train.attacks, ATTACKS, instantiate=True)
        if train.attack_defenses:
            trained = set(train.defenses or defenses)
            stray = [d for d in train.attack_defenses if d not in trained]
            if stray:
                raise _fail(where, "train.attack_defenses", f"{stray} are not trained (train.defenses or defenses)")
        if train.attack_steps:
            try:  # a step past the run's end is refused now, not after the training
                train_records(TrainJob((train.attack_defenses or train.defenses or defenses)[0], train, Path(".")))
            except GiaBenchError as exc:
                raise _fail(where, "train.attack_steps", str(exc)) from None
        for defense in train.defenses or defenses:  # each run as the trainer will check it, now
            try:
                train_config(TrainJob(defense, train, Path("."))).validate()
            except GiaBenchError as exc:
                raise _fail(where, "train", f"defense {defense!r}: {exc}") from None
    return StudyConfig(
        name=name,
        datasets=datasets,
        models=models,
        defenses=defenses,
        attacks=attacks,
        views=views,
        batch_sizes=batch_sizes,
        images=images,
        seeds=seeds,
        model_mode=model_mode,
        fewbit_backward=fewbit_backward,
        train=train,
    )


def load_study(path: Path) -> StudyConfig:
    """Read and validate a study TOML file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such study file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_study(raw, path)


# -- planning --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaptureJob:
    """Records of one (dataset, model, batch size, seed, defense)."""

    dataset: str
    model: str
    batch_size: int
    seed: int
    defense: str
    images: int
    model_mode: str
    out: Path
    fewbit_backward: int = 0

    @property
    def group(self) -> str:
        return f"{slug(self.dataset)}-{slug(self.model)}-b{self.batch_size}-s{self.seed}"


@dataclasses.dataclass(frozen=True)
class AttackJob:
    """One attack in one view on one record."""

    record: Path
    attack: str
    view: str
    out_root: Path
    seed: int
    defense: str = ""  # the record's defense spec ("": read from the record's header)

    @property
    def result(self) -> Path:
        from gia_bench.attacks import create as create_attack
        from gia_bench.evaluate import result_dir
        from gia_bench.results import RESULT_FILE
        from gia_bench.records import RECORD_SUFFIX, read_meta

        record_id = self.record.name.removesuffix(RECORD_SUFFIX)  # capture names files by record id
        defense = self.defense or read_meta(self.record).defense
        return result_dir(self.out_root, record_id, create_attack(self.attack), self.view, defense, self.seed) / RESULT_FILE


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """One training run (accuracy and wire bytes of one defense)."""

    defense: str
    plan: TrainPlan
    out: Path

    @property
    def done(self) -> bool:
        return (self.out / "metrics.json").exists() and _train_finished(self.out, self.plan.epochs)


def _train_finished(out: Path, epochs: int) -> bool:
    import json

    try:
        data = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return len(data.get("epochs", [])) >= epochs


def capture_jobs(config: StudyConfig, out: Path) -> list[CaptureJob]:
    jobs = []
    for dataset in config.datasets:
        for model in config.models:
            for batch_size in config.batch_sizes:
                for seed in config.seeds:
                    for defense in config.defenses:
                        job = CaptureJob(
                            dataset, model, batch_size, seed, defense, config.images, config.model_mode, Path(),
                            config.fewbit_backward,
                        )
                        jobs.append(dataclasses.replace(job, out=out / "records" / job.group / slug(defense)))
    return jobs


def attack_jobs(config: StudyConfig, out: Path, records: dict[CaptureJob, list[Path]]) -> list[AttackJob]:
    jobs = []
    for cap, paths in records.items():
        root = out / "runs" / cap.group  # the result folder adds the defense (gia_bench.evaluate.result_dir)
        for path in paths:
            for attack in config.attacks:
                for view in config.views:
                    jobs.append(AttackJob(path, attack, view, root, cap.seed, cap.defense))
    return jobs


def train_jobs(config: StudyConfig, out: Path) -> list[TrainJob]:
    if config.train is None:
        return []
    defenses = config.train.defenses or config.defenses
    return [TrainJob(d, config.train, out / "train" / slug(d)) for d in defenses]


def train_attack_jobs(config: StudyConfig, out: Path, trains: list[TrainJob]) -> list[AttackJob]:
    """The study's (or ``[train] attacks``) attacks and views on the records of every run's ``attack_steps``."""
    jobs = []
    plan = config.train
    for job in trains:
        if plan is None or not _attacked(job):
            continue
        root = train_attack_root(job, out)
        for path in train_records(job).values():
            for attack in plan.attacks or config.attacks:
                for view in config.views:
                    jobs.append(AttackJob(path, attack, view, root, job.plan.seed, job.defense))
    return jobs


def train_config(job: TrainJob, device: str = "cpu") -> Any:
    """The :class:`~gia_bench.train.TrainConfig` of a study's training run (records at ``attack_steps``)."""
    from gia_bench.train import CHECKPOINT_FILE, TrainConfig

    plan = job.plan
    cpu = device == "cpu"
    return TrainConfig(
        out=job.out,
        dataset=plan.dataset,
        model=plan.model,
        defense=job.defense,
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        lr=plan.lr,
        momentum=plan.momentum,
        weight_decay=plan.weight_decay,
        seed=plan.seed,
        nproc_per_node=plan.nproc_per_node,
        capture_steps=tuple(plan.attack_steps) if _attacked(job) else (),
        fewbit_backward=plan.fewbit_backward,
        backend="gloo" if cpu else "auto",
        device="cpu" if cpu else "auto",
        resume=(job.out / CHECKPOINT_FILE).exists(),
    )


def _attacked(job: TrainJob) -> bool:
    return job.plan.attack_defenses is None or job.defense in job.plan.attack_defenses


def train_records(job: TrainJob) -> dict[int, Path]:
    """``step -> record path`` of the records the run writes at ``attack_steps`` (``"end"`` resolved)."""
    if not job.plan.attack_steps or not _attacked(job):
        return {}
    from gia_bench.train import RECORDS_DIR, planned_steps
    from gia_bench.train.records import record_path

    config = train_config(job)
    steps = config.capture_plan(planned_steps(config))
    return {s: record_path(job.out / RECORDS_DIR, s) for s in steps}


def train_attack_root(job: TrainJob, out: Path) -> Path:
    """Where the attacks on a run's records write: ``runs/train-<dataset>-<model>-b<B>-s<seed>``.

    Like a capture group; the result folder adds the defense and the record id
    (:func:`gia_bench.evaluate.result_dir`), so results of two runs never share a folder.
    """
    plan = job.plan
    return out / "runs" / f"train-{slug(plan.dataset)}-{slug(plan.model)}-b{plan.batch_size}-s{plan.seed}"


def expected_records(job: CaptureJob) -> list[Path]:
    """The record paths a finished capture job has (ids follow ``capture.record_id``)."""
    from gia_bench.capture import record_id

    return [job.out / f"{record_id(job.dataset, job.model, i)}.safetensors" for i in range(job.images)]


# -- running ---------------------------------------------------------------------------------------

STUDY_FILE = "study.toml"
FAILURES_FILE = "failures.json"


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    """How to run a study (the CLI's flags).

    ``engine``: ``local`` (this machine: the driver plus ``workers - 1`` warm worker
    processes) or ``ray`` (every unit a Ray task; ``address`` of a running cluster, or a
    local Ray when None). ``plugins``: ``module:Class`` names the user trusted
    (``--plugin``); they reach every unit through its context.
    """

    workers: int = 1
    device: str = "cpu"
    lpips_net: str = "alex"
    lpips_weights: Path | None = None
    report: bool = True
    engine: str = "local"
    address: str | None = None
    plugins: tuple[str, ...] = ()  # module:Class names the user trusts (--plugin), for every unit
    max_memory: int = DEFAULT_MAX_MEMORY  # bytes one attack may use (--max-memory; gia_bench.budget)


@dataclasses.dataclass(frozen=True)
class StudyStatus:
    """Done / total per stage, and the failures recorded so far.

    ``ran``: units this run executed, per kind (empty for ``study show``): a resumed run
    executes only what was missing.
    """

    captures: tuple[int, int]
    attacks: tuple[int, int]
    trains: tuple[int, int]
    failures: tuple[dict[str, str], ...]
    report: Path | None
    ran: Mapping[str, int] = dataclasses.field(default_factory=dict)


def _write_text_atomic(path: Path, text: str) -> None:
    from gia_bench.io import atomic_write_text

    atomic_write_text(path, text)


def prepare(source: Path | str, out: Path) -> StudyConfig:
    """Validate the study file and pin it to ``out``; a folder holds one study (a rerun resumes it).

    ``out`` is new, empty, or a study folder (it holds ``study.toml``); a folder holding anything
    else is refused, so a study never writes among the user's own files.
    """
    source_text = Path(source).read_text(encoding="utf-8") if Path(source).exists() else None
    config = load_study(Path(source))
    out = Path(out)
    pinned = out / STUDY_FILE
    # the pinned study.toml marks a study folder (prepare writes it before any unit runs); any
    # other folder with files in it is the user's, and a study would write beside them
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a study folder; choose a new or empty folder")
    if out.is_dir() and not pinned.exists() and any(out.iterdir()):
        raise ConfigError(
            f"--out {out}: is not empty and not a study folder (no {STUDY_FILE}); choose a new or empty folder"
        )
    if pinned.exists() and pinned.resolve() != Path(source).resolve():
        previous = load_study(pinned)
        if previous != config:
            raise ConfigError(
                f"--out {out}: holds another study ({pinned} differs from {source}); choose another folder"
            )
    elif not pinned.exists():
        _write_text_atomic(pinned, source_text or "")
    return config


# -- units: what the engines run (gia_bench.engines) -----------------------------------------------


def _rel(path: Path, out: Path) -> str:
    return Path(path).relative_to(out).as_posix()


def _capture_unit(ctx: Any, dataset: str, model: str, defense: str, batch_size: int, images: int, seed: int,
                  model_mode: str, out: str, fewbit_backward: int = 0) -> None:
    from gia_bench.capture import CaptureConfig, capture
    from gia_bench.registry import trusted

    with trusted(ctx.plugins):  # a worker (or a Ray task) applies the user's --plugin set itself
        capture(CaptureConfig(dataset, model, defense, batch_size, images, seed, ctx.outputs / out,
                              model_mode=model_mode, device=ctx.device, fewbit_backward=fewbit_backward))


def _attack_unit(ctx: Any, record: str, attack: str, view: str, out_root: str, seed: int,
                 max_memory: int = DEFAULT_MAX_MEMORY) -> None:
    from gia_bench.evaluate import run_attack
    from gia_bench.registry import trusted

    with trusted(ctx.plugins):
        run_attack(
            ctx.inputs / record, attack, view, ctx.outputs / out_root, seed=seed, device=ctx.device,
            lpips_net=ctx.lpips_net, lpips_weights=ctx.lpips_weights, max_memory=max_memory,
        )


def _plan_of(plan: Mapping[str, Any]) -> TrainPlan:
    """A :class:`TrainPlan` back from its ``dataclasses.asdict`` (a unit's args may come back with lists)."""
    return TrainPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan.items()})


def _train_unit(ctx: Any, defense: str, plan: dict[str, Any], out: str) -> None:
    from gia_bench.train import launch

    # the trainer saves rank 0's records at attack_steps (train_config), the attack units read them
    config = train_config(TrainJob(defense, _plan_of(plan), ctx.inputs / out), ctx.device)
    launch(config, fork=ctx.device == "cpu" and ctx.fork_ok)


def _train_done(root: Path, unit: Any) -> bool:
    return _train_finished(root / unit.workdir, unit.args["plan"]["epochs"])


def _attack_done(root: Path, unit: Any) -> bool:
    """An attack unit is finished when its result.json is current for the record now in the folder."""
    from gia_bench.evaluate import result_is_current

    a = unit.args
    return result_is_current(root / unit.outputs[0], root / a["record"], a["attack"], a["view"], a["seed"])


def plan_units(config: StudyConfig, out: Path, options: StudyOptions = StudyOptions()) -> list[Any]:
    """The study's units in run order: captures, the attacks on their records, trainings, the
    attacks on the trainings' records (``[train] attack_steps``).

    Each attack depends on the capture or training run that writes its record; paths are
    relative to ``out``.
    """
    from gia_bench.engines import Unit
    from gia_bench.records import RECORD_SUFFIX, truth_path

    out = Path(out)
    cuda = options.device.startswith("cuda")
    units: list[Unit] = []
    caps = capture_jobs(config, out)
    records = {job: expected_records(job) for job in caps}
    for job in caps:
        units.append(Unit(
            kind="capture",
            key=f"capture:{_rel(job.out, out)}",
            fn="gia_bench.study:_capture_unit",
            args=dict(dataset=job.dataset, model=job.model, defense=job.defense, batch_size=job.batch_size,
                      images=job.images, seed=job.seed, model_mode=job.model_mode, out=_rel(job.out, out),
                      fewbit_backward=job.fewbit_backward),
            outputs=tuple(_rel(p, out) for p in records[job]),
            label=(("defense", job.defense), ("data", job.group), ("images", str(job.images))),
            gpus=1 if cuda else 0,
        ))
    cap_of = {path: job for job, paths in records.items() for path in paths}
    for job in attack_jobs(config, out, records):
        cap = cap_of[job.record]
        record = _rel(job.record, out)
        units.append(Unit(
            kind="attack",
            key=f"attack:{_rel(job.result, out)}",
            fn="gia_bench.study:_attack_unit",
            args=dict(record=record, attack=job.attack, view=job.view, out_root=_rel(job.out_root, out),
                      seed=job.seed, max_memory=options.max_memory),
            outputs=(_rel(job.result, out),),
            inputs=(record, _rel(truth_path(job.record), out)),
            deps=(f"capture:{_rel(cap.out, out)}",),
            done_check="gia_bench.study:_attack_done",
            label=(("defense", cap.defense), ("attack", job.attack), ("view", job.view),
                   ("record", job.record.name.removesuffix(RECORD_SUFFIX)), ("step", "0")),
            gpus=1 if cuda else 0,
        ))
    trains = train_jobs(config, out)
    for job in trains:
        plan = dataclasses.asdict(job.plan)
        units.append(Unit(
            kind="train",
            key=f"train:{_rel(job.out, out)}",
            fn="gia_bench.study:_train_unit",
            args=dict(defense=job.defense, plan=plan, out=_rel(job.out, out)),
            outputs=(_rel(job.out / "metrics.json", out),),
            label=(("defense", job.defense), ("data", f"{job.plan.dataset}-{job.plan.model}"),
                   ("epochs", str(job.plan.epochs)), ("workers", str(job.plan.nproc_per_node))),
            cpus=1 if cuda else job.plan.nproc_per_node,
            gpus=job.plan.nproc_per_node if cuda else 0,
            workdir=_rel(job.out, out),
            done_check="gia_bench.study:_train_done",
        ))
    for job in trains:
        steps = {path: step for step, path in train_records(job).items()}
        for attack_job in train_attack_jobs(config, out, [job]):
            record = _rel(attack_job.record, out)
            units.append(Unit(
                kind="attack",
                key=f"attack:{_rel(attack_job.result, out)}",
                fn="gia_bench.study:_attack_unit",
                args=dict(record=record, attack=attack_job.attack, view=attack_job.view,
                          out_root=_rel(attack_job.out_root, out), seed=attack_job.seed,
                          max_memory=options.max_memory),
                outputs=(_rel(attack_job.result, out),),
                inputs=(record, _rel(truth_path(attack_job.record), out)),
                deps=(f"train:{_rel(job.out, out)}",),
                done_check="gia_bench.study:_attack_done",
                label=(("defense", job.defense), ("attack", attack_job.attack), ("view", attack_job.view),
                       ("record", attack_job.record.name.removesuffix(RECORD_SUFFIX)),
                       ("step", str(steps[attack_job.record]))),
                gpus=1 if cuda else 0,
            ))
    return units


def run_study(
    config: StudyConfig, out: Path, options: StudyOptions = StudyOptions(), events: Events = SILENT
) -> StudyStatus:
    """Capture, attack, train and report; finished units are skipped, so this resumes.

    The units run on ``options.engine`` (see :mod:`gia_bench.engines`). Ctrl-C cancels
    the units in flight (their partial files are removed) and re-raises
    KeyboardInterrupt; everything finished stays on disk.
    ``options.plugins`` are trusted for every unit (worker processes inherit them).
    ``events`` hears the plan and each unit (:mod:`gia_bench.engines.progress`).
    """
    from gia_bench.registry import trusted

    with trusted(options.plugins):
        return _run_study(config, out, options, events)


def _run_study(config: StudyConfig, out: Path, options: StudyOptions, events: Events) -> StudyStatus:
    import json

    from gia_bench.engines import UnitContext, run_units
    from gia_bench.engines.local import default_threads

    out = Path(out)
    if options.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {options.workers}")
    from gia_bench.budget import check_study

    check_study(config, options.max_memory, out / STUDY_FILE)
    units = plan_units(config, out, options)
    ctx = UnitContext(
        inputs=out, outputs=out, device=options.device, threads=default_threads(options.workers),
        lpips_net=options.lpips_net, lpips_weights=options.lpips_weights, plugins=tuple(options.plugins),
    )
    result = run_units(units, out, ctx, engine=options.engine, workers=options.workers, address=options.address,
                       events=events)
    failures = result.failures
    _write_text_atomic(out / FAILURES_FILE, json.dumps(failures, indent=2))
    report = None
    if options.report:
        from gia_bench.reports import ReportOptions, make_report

        runs = tuple(p for p in (out / "runs", out / "train") if p.exists())
        if runs:
            make_report(
                ReportOptions(
                    runs=runs, out=out / "report", lpips_net=options.lpips_net, lpips_weights=options.lpips_weights
                )
            )
            report = out / "report"
    st = status(out, config, failures=failures, report=report)
    return dataclasses.replace(st, ran=dict(result.ran))


def status(out: Path, config: StudyConfig | None = None, failures: list[dict[str, str]] | None = None,
           report: Path | None = None) -> StudyStatus:
    """What is done and what is left in a study folder (``gia-bench study show``)."""
    import json

    from gia_bench.evaluate import result_is_current

    out = Path(out)
    if config is None:
        if not (out / STUDY_FILE).exists():
            raise ConfigError(f"{out}: not a study folder (no {STUDY_FILE})")
        config = load_study(out / STUDY_FILE)
    caps = capture_jobs(config, out)
    records = {job: expected_records(job) for job in caps}
    caps_done = sum(all(p.exists() for p in paths) for paths in records.values())
    trains = train_jobs(config, out)
    jobs = attack_jobs(config, out, records) + train_attack_jobs(config, out, trains)
    attacks_done = sum(result_is_current(j.result, j.record, j.attack, j.view, j.seed) for j in jobs)
    if failures is None:
        try:
            failures = json.loads((out / FAILURES_FILE).read_text())
        except (OSError, ValueError):
            failures = []
    if report is None and (out / "report" / "report.html").exists():
        report = out / "report"
    return StudyStatus(
        captures=(caps_done, len(caps)),
        attacks=(attacks_done, len(jobs)),
        trains=(sum(t.done for t in trains), len(trains)),
        failures=tuple(failures),
        report=report,
    )
