"""Planning a study: the grid -> capture, attack and training jobs -> the units an engine runs.

:func:`plan_units` turns the grid into units (an attack depends on the capture, or the
training run, that writes its record); paths are relative to the study folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from gia_bench.study.schema import StudyConfig, StudyTrain, slug

if TYPE_CHECKING:
    from gia_bench.capture import CaptureConfig
    from gia_bench.engines import Unit
    from gia_bench.study.run import StudyOptions
    from gia_bench.train import TrainConfig


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
    data_root: Path | None = None

    @property
    def group(self) -> str:
        return f"{slug(self.dataset)}-{slug(self.model)}-b{self.batch_size}-s{self.seed}"

    def capture_config(self, out: Path) -> CaptureConfig:
        """The :class:`~gia_bench.capture.CaptureConfig` of this job, writing under ``out``."""
        from gia_bench.capture import CaptureConfig

        return CaptureConfig(
            dataset=self.dataset, model=self.model, defense=self.defense, batch_size=self.batch_size,
            num=self.images, seed=self.seed, out=out, model_mode=self.model_mode,
            fewbit_backward=self.fewbit_backward, data_root=self.data_root,
        )


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
    """One training run (accuracy and wire bytes of one defense at one seed)."""

    defense: str
    seed: int
    train: StudyTrain
    out: Path

    @property
    def done(self) -> bool:
        return train_finished(self.out, self.train.base.epochs)


def train_finished(out: Path, epochs: int) -> bool:
    """Has the run in ``out`` written ``epochs`` epochs to its metrics.json?"""
    try:
        data = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return len(data.get("epochs", [])) >= epochs


def cell_dataset(dataset: str, model: str) -> str:
    """The data set spec one grid cell loads: a text data set that names no tokenizer takes the model's.

    A study crosses every data set with every model, and a text model reads only its own
    tokenizer's ids (``smollm2``: SmolLM2's; ``minilm``, ``transformer``: BERT's), so ``pii``
    beside ``smollm2`` is loaded as ``pii:tokenizer=smollm2``; a spec that names its tokenizer
    is kept as written (a mismatch is then the model's error, naming the tokenizer).
    """
    import inspect

    from gia_bench.data import DATASETS
    from gia_bench.errors import GiaBenchError
    from gia_bench.models import MODELS
    from gia_bench.registry import Spec, parse_spec

    try:
        data, net = parse_spec(dataset), parse_spec(model)
        data_cls, model_cls = DATASETS.get(data.name), MODELS.get(net.name)
    except GiaBenchError:
        return dataset  # checked (and refused) elsewhere with its own message
    wanted = getattr(model_cls, "tokenizer", None) if getattr(model_cls, "modality", "") == "text" else None
    param = inspect.signature(data_cls.__init__).parameters.get("tokenizer")
    if wanted is None or param is None or "tokenizer" in data.kwargs or param.default == wanted:
        return dataset
    return str(Spec(data.name, {"tokenizer": wanted, **data.kwargs}))


def capture_jobs(config: StudyConfig, out: Path) -> list[CaptureJob]:
    jobs = []
    for data_spec in config.datasets:
        for model in config.models:
            dataset = cell_dataset(data_spec, model)
            for batch_size in config.batch_sizes:
                for seed in config.seeds:
                    for defense in config.defenses:
                        job = CaptureJob(
                            dataset, model, batch_size, seed, defense, config.images, config.model_mode, Path(),
                            config.fewbit_backward, config.data_root,
                        )
                        jobs.append(dataclasses.replace(job, out=out / "records" / job.group / slug(defense)))
    return jobs


def expected_records(job: CaptureJob) -> list[Path]:
    """The record paths a finished capture job has (ids follow ``capture.record_id``)."""
    from gia_bench.capture import record_id

    return [job.out / f"{record_id(job.dataset, job.model, i)}.safetensors" for i in range(job.images)]


def attack_jobs(config: StudyConfig, out: Path, records: dict[CaptureJob, list[Path]]) -> list[AttackJob]:
    jobs = []
    for cap, paths in records.items():
        root = out / "runs" / cap.group  # the result folder adds the defense (gia_bench.evaluate.result_dir)
        for path in paths:
            for attack in config.attacks_for(cap.model):
                for view in config.views:
                    jobs.append(AttackJob(path, attack, view, root, cap.seed, cap.defense))
    return jobs


def train_jobs(config: StudyConfig, out: Path) -> list[TrainJob]:
    """One run per trained defense and seed: ``train/<defense>`` (one seed) or ``train/<defense>/s<seed>``."""
    train = config.train
    if train is None:
        return []
    jobs = []
    for defense in train.defenses or config.defenses:
        for seed in train.run_seeds:
            folder = out / "train" / slug(defense)
            jobs.append(TrainJob(defense, seed, train, folder if train.seeds is None else folder / f"s{seed}"))
    return jobs


def attacked(job: TrainJob) -> bool:
    """Are the run's records at ``attack_steps`` attacked (``attack_defenses``)?"""
    return job.train.attack_defenses is None or job.defense in job.train.attack_defenses


def train_config(job: TrainJob, device: str = "cpu") -> TrainConfig:
    """The :class:`~gia_bench.train.TrainConfig` of a study's run: ``[train]``'s overrides, the run's
    defense, seed and folder, records at ``attack_steps``, and the study's device.

    Built where the run starts: the trainer's threads per worker follow that process's threads.
    """
    from gia_bench.train import CHECKPOINT_FILE, TrainConfig

    cpu = device == "cpu"
    return TrainConfig(**{
        **dict(job.train.overrides),
        "out": job.out,
        "defense": job.defense,
        "seed": job.seed,  # the run's: [train] seed or one of [train] seeds
        "capture_steps": tuple(job.train.attack_steps) if attacked(job) else (),
        "backend": "gloo" if cpu else "auto",
        "device": "cpu" if cpu else "auto",
        "resume": (job.out / CHECKPOINT_FILE).exists(),
    })


def train_records(job: TrainJob) -> dict[int, Path]:
    """``step -> record path`` of the records the run writes at ``attack_steps`` (``"end"`` resolved)."""
    if not job.train.attack_steps or not attacked(job):
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
    base = job.train.base
    return out / "runs" / f"train-{slug(base.dataset)}-{slug(base.model)}-b{base.batch_size}-s{job.seed}"


def train_attack_jobs(config: StudyConfig, out: Path, trains: list[TrainJob]) -> list[AttackJob]:
    """The study's (or ``[train] attacks``) attacks and views on the records of every run's ``attack_steps``."""
    jobs = []
    train = config.train
    for job in trains:
        if train is None or not attacked(job):
            continue
        root = train_attack_root(job, out)
        for path in train_records(job).values():
            for attack in train.attacks or config.attacks_for(train.base.model):
                for view in config.views:
                    jobs.append(AttackJob(path, attack, view, root, job.seed, job.defense))
    return jobs


# -- units: what the engines run (gia_bench.engines) -----------------------------------------------


def _rel(path: Path, out: Path) -> str:
    return Path(path).relative_to(out).as_posix()


def _plan_attack(job: AttackJob, out: Path, dep: str, defense: str, step: int, options: StudyOptions) -> Unit:
    from gia_bench.engines import Unit
    from gia_bench.records import RECORD_SUFFIX, truth_path
    from gia_bench.study.units import AttackArgs, attack_done, attack_unit

    record = _rel(job.record, out)
    return Unit(
        kind="attack",
        key=f"attack:{_rel(job.result, out)}",
        fn=attack_unit,
        args=dict(job=AttackArgs(record=record, attack=job.attack, view=job.view,
                                 out_root=_rel(job.out_root, out), seed=job.seed, max_memory=options.max_memory)),
        outputs=(_rel(job.result, out),),
        inputs=(record, _rel(truth_path(job.record), out)),
        deps=(dep,),
        done_check=attack_done,
        label=(("defense", defense), ("attack", job.attack), ("view", job.view),
               ("record", job.record.name.removesuffix(RECORD_SUFFIX)), ("step", str(step))),
        gpus=1 if options.device.startswith("cuda") else 0,
    )


def _capture_units(config: StudyConfig, out: Path, options: StudyOptions) -> list[Unit]:
    """Each capture job's unit, then the attacks on its records."""
    from gia_bench.engines import Unit
    from gia_bench.study.units import capture_unit

    gpus = 1 if options.device.startswith("cuda") else 0
    units: list[Unit] = []
    records = {job: expected_records(job) for job in capture_jobs(config, out)}
    for job, paths in records.items():
        units.append(Unit(
            kind="capture",
            key=f"capture:{_rel(job.out, out)}",
            fn=capture_unit,
            args=dict(config=job.capture_config(Path(_rel(job.out, out)))),
            outputs=tuple(_rel(p, out) for p in paths),
            label=(("defense", job.defense), ("data", job.group), ("images", str(job.images))),
            gpus=gpus,
        ))
    cap_of = {path: job for job, paths in records.items() for path in paths}
    for job in attack_jobs(config, out, records):
        cap = cap_of[job.record]
        units.append(_plan_attack(job, out, f"capture:{_rel(cap.out, out)}", cap.defense, 0, options))
    return units


def _train_units(config: StudyConfig, out: Path, options: StudyOptions) -> list[Unit]:
    """Each training run's unit, then the attacks on the records it saves at ``attack_steps``."""
    from gia_bench.engines import Unit
    from gia_bench.study.units import TrainArgs, train_done, train_unit

    cuda = options.device.startswith("cuda")
    trains = train_jobs(config, out)
    units: list[Unit] = []
    for job in trains:
        base = job.train.base
        units.append(Unit(
            kind="train",
            key=f"train:{_rel(job.out, out)}",
            fn=train_unit,
            args=dict(job=TrainArgs(defense=job.defense, seed=job.seed, train=job.train, out=_rel(job.out, out))),
            outputs=(_rel(job.out / "metrics.json", out),),
            label=(("defense", job.defense), ("data", f"{base.dataset}-{base.model}"),
                   *((("seed", str(job.seed)),) if job.train.seeds is not None else ()),
                   ("epochs", str(base.epochs)), ("workers", str(base.nproc_per_node))),
            cpus=1 if cuda else base.nproc_per_node,
            gpus=base.nproc_per_node if cuda else 0,
            workdir=_rel(job.out, out),
            done_check=train_done,
        ))
    for job in trains:
        steps = {path: step for step, path in train_records(job).items()}
        for attack_job in train_attack_jobs(config, out, [job]):
            dep = f"train:{_rel(job.out, out)}"
            units.append(_plan_attack(attack_job, out, dep, job.defense, steps[attack_job.record], options))
    return units


def plan_units(config: StudyConfig, out: Path, options: StudyOptions | None = None) -> list[Unit]:
    """The study's units in run order: captures, the attacks on their records, trainings, the
    attacks on the trainings' records (``[train] attack_steps``).

    Each attack depends on the capture or training run that writes its record; paths are
    relative to ``out``.
    """
    from gia_bench.study.run import StudyOptions

    options = options or StudyOptions()
    out = Path(out)
    return _capture_units(config, out, options) + _train_units(config, out, options)
