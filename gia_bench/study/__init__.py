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
    data_root = "data"         # optional: torchvision data sets (cifar10...), captures and [train]

    [train]                    # optional: accuracy, bytes and leakage along real DDP training
    dataset = "digits"         # any TrainConfig field (gia-bench train's flags); omitted: its default
    model = "convnet:width=16"
    epochs = 2
    batch_size = 8             # per worker; also the batch the attacks at attack_steps face
    nproc_per_node = 2         # lr: omitted -> 0.1 x global batch / 256 (the trainer's rule)
    attack_steps = [0, 50, "end"]   # optimizer steps whose rank-0 messages the attacks target
    fewbit_backward = 4        # optional: train with Few-Bit Backward activations (0: exact)
    seeds = [0, 1, 2]          # optional: one run per defense and seed (train/<defense>/s<seed>)

A study file is a path or a built-in study's name (``demo``, ``lqsgd-paper``, ``text``; the files
in ``gia_bench/studies``). A text data set that names no tokenizer is loaded with each model's
own (``pii`` beside ``smollm2`` is ``pii:tokenizer=smollm2``: :func:`~gia_bench.study.plan.cell_dataset`).

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
    DIR/train/<defense>[/s<seed>]/metrics.json       (+ records/step0000050.safetensors at attack_steps)
    DIR/runs/train-<dataset>-<model>-b<B>-s<seed>/<defense>/step0000050/<attack>-<view>/result.json
    DIR/report/                                      report.html, report.md, CSVs, figures
    DIR/.staging/                                    units in flight (their files move out when finished)

A unit of work is finished when its output file exists (outputs are written
atomically), so a rerun skips it: studies resume after Ctrl-C or a crash.
Modules: :mod:`~gia_bench.study.schema` (keys, ``[train]``), :mod:`~gia_bench.study.parse`
(checks), :mod:`~gia_bench.study.plan` (jobs, units), :mod:`~gia_bench.study.units` (what a
unit runs), :mod:`~gia_bench.study.run` (running, status). :func:`plan_units` turns the
grid into units (an attack depends on the capture, or the training run, that writes its
record) and :func:`run_study` hands them to an engine (:mod:`gia_bench.engines`: ``local``
or ``ray``).
"""

from __future__ import annotations

from gia_bench.study.parse import count_units, parse_study
from gia_bench.study.plan import (
    AttackJob,
    CaptureJob,
    TrainJob,
    attack_jobs,
    capture_jobs,
    expected_records,
    plan_units,
    train_attack_jobs,
    train_attack_root,
    train_config,
    train_jobs,
    train_records,
)
from gia_bench.study.run import FAILURES_FILE, STUDY_FILE, StudyOptions, StudyStatus, prepare, run_study, status
from gia_bench.study.schema import (
    DEFAULT_VIEWS,
    DEMO_STUDY,
    MAX_IMAGES,
    MAX_UNITS,
    STUDIES_DIR,
    StudyConfig,
    StudyTrain,
    builtin_studies,
    load_study,
    resolve_study,
    slug,
    tomllib,
)

__all__ = [
    "DEFAULT_VIEWS", "DEMO_STUDY", "FAILURES_FILE", "MAX_IMAGES", "MAX_UNITS", "STUDIES_DIR", "STUDY_FILE",
    "AttackJob", "CaptureJob", "StudyConfig", "StudyOptions", "StudyStatus", "StudyTrain", "TrainJob",
    "attack_jobs", "builtin_studies", "capture_jobs", "count_units", "expected_records", "load_study",
    "parse_study", "plan_units", "prepare", "resolve_study", "run_study", "slug", "status", "tomllib",
    "train_attack_jobs", "train_attack_root", "train_config", "train_jobs", "train_records",
]  # fmt: skip
