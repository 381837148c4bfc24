"""A training run's configuration: :class:`TrainConfig`, its validation, and its data."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import torch

from gia_bench.errors import ConfigError, GiaBenchError

METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "train_config.json"
RECORDS_DIR = "records"
#: hidden fault injection for tests: "RANK:STEP" makes that rank exit with code 17 before that global step
FAIL_ENV = "GIA_BENCH_TRAIN_FAIL_AT"
FAIL_EXIT_CODE = 17
#: A worker whose collective failed because a peer is gone exits with this code, so that
#: the launcher names the worker that failed first, not the ones that lost it (it lingers
#: first: :func:`gia_bench.train.watchdog.peer_lost_linger`).
PEER_LOST_EXIT_CODE = 75


class TrainError(GiaBenchError):
    """A training run failed (a worker died, the rendezvous failed)."""


#: The default learning rate is ``BASE_LR x global batch / BASE_BATCH`` (see :func:`default_lr`).
BASE_LR = 0.1
BASE_BATCH = 256
#: The default linear warm-up spans this fraction of the run's optimizer steps, and at least
#: :data:`WARMUP_MIN_STEPS` (or the first epoch, when an epoch is shorter).
WARMUP_FRACTION = 0.05
#: A run of a few short epochs (digits at batch 64 on 2 workers: 11 steps an epoch) warmed up
#: over 5 % of its steps alone ramps to the peak in 2 steps, and uncompressed SGD diverged in
#: its first epoch (52.9 % after 3 epochs; 91.4 % with the first epoch as warm-up:
#: benchmarks/lqsgd_convergence.py). Ten steps, or the first epoch if shorter, avoid that.
WARMUP_MIN_STEPS = 10


def default_lr(global_batch: int) -> float:
    """The linear scaling rule: ``0.1 x global batch / 256``.

    Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
    Sec. 2.1 (eq. 3: multiply the learning rate by k when the minibatch grows k-fold;
    0.1 for 256 images is the ResNet reference of He et al. 2016). ``global_batch`` is
    the per-worker batch times the number of workers: the aggregate every step applies
    is the mean over that many examples.
    """
    if global_batch < 1:
        raise ConfigError(f"global batch must be >= 1, got {global_batch}")
    return BASE_LR * global_batch / BASE_BATCH


def default_warmup(total_steps: int, steps_per_epoch: int | None = None) -> int:
    """Linear warm-up steps when none are given (Goyal et al. 2017, Sec. 2.2): 5% of the run, and at
    least :data:`WARMUP_MIN_STEPS` or one epoch, whichever is shorter; never more than the run, at least 1."""
    floor = WARMUP_MIN_STEPS if steps_per_epoch is None else min(WARMUP_MIN_STEPS, steps_per_epoch)
    return max(1, min(total_steps, max(math.ceil(WARMUP_FRACTION * total_steps), floor)))


def parse_capture_steps(text: str) -> tuple[int | str, ...]:
    """``"0,50,end"`` -> ``(0, 50, "end")`` (``--capture-steps``); raises :class:`ConfigError` naming the flag."""
    steps: list[int | str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "end":
            steps.append("end")
        elif part.isdigit():
            steps.append(int(part))
        else:
            raise ConfigError(f'--capture-steps: {part!r} is not an optimizer step (an integer >= 0) or "end"')
    return tuple(steps)


def lr_at(peak: float, schedule: str, step: int, total: int, warmup: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``.

    Steps ``0 .. warmup-1`` ramp linearly to ``peak`` (``peak (step+1) / warmup``, Goyal et
    al. 2017, Sec. 2.2, gradual warm-up); afterwards ``constant`` keeps ``peak`` and
    ``cosine`` decays it to 0 over the remaining steps (Loshchilov & Hutter 2017, SGDR eq. 5
    without restarts). A function of the step alone, so a resumed run continues it exactly.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    rest = max(total - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / rest))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch_size`` is per worker.

    ``lr`` None (the default) takes :func:`default_lr` of the global batch (``batch_size``
    x workers); a given ``lr`` is used as is, whatever the world size.

    Args:
        out: run folder (metrics.json, checkpoint.pt, records/).
        dataset: data set name (``digits`` ships with scikit-learn).
        model: model spec (``resnet18``, ``lenet``, ``mlp:hidden=64``...).
        defense: compressor spec (``lqsgd:rank=2``).
        epochs: epochs in total (a resumed run continues up to this).
        batch_size: examples per worker per step.
        lr: peak SGD learning rate; None: 0.1 x global batch / 256 (:func:`default_lr`).
        lr_warmup_steps: linear warm-up to the peak over this many steps; None: 5% of the
            run, at least 10 steps or the first epoch (:func:`default_warmup`); 0: none.
        momentum: SGD momentum, applied after the reduce.
        weight_decay: SGD weight decay, applied after the reduce.
        lr_schedule: ``constant`` or ``cosine`` (cosine decay to 0 over all steps).
        warmup_steps: uncompressed steps first: sets the compressor's ``start_iter``.
        collective: sets the compressor's ``collective`` (``auto``, ``allgather``, ``alltoall``).
        capture_every: save rank 0's GradientRecord every K steps (0: never).
        capture_steps: also save it at these optimizer steps (0-based; ``"end"``: the last step).
        capture_ranks: the workers whose steps are saved (rank 0 by default; a curious server
            sees them all; ``step0000050-rank1`` names another rank's record).
        seed: model init, data order and compressor seeds derive from it.
        nproc_per_node: workers on this machine.
        nnodes: machines (``N`` or ``MIN:MAX``), as torchrun's ``--nnodes``.
        rdzv_endpoint: ``host:port`` of the rendezvous for several machines.
        rdzv_id: run id shared by all machines of one job.
        backend: ``auto`` (nccl with GPUs, else gloo), ``gloo`` or ``nccl``.
        device: ``auto`` (``cuda:LOCAL_RANK`` when there is a GPU), ``cpu`` or ``cuda``.
        bucket_cap_mb: DDP bucket size.
        max_steps_per_epoch: stop each epoch early (tests, benchmarks).
        data_root: folder of torchvision data sets (``--data-root``).
        download: let torchvision download the data set into ``data_root``.
        threads_per_worker: torch / OpenMP threads per worker process; None: ``OMP_NUM_THREADS`` if
            set, else the free cores shared among the workers (:mod:`gia_bench.threads`).
        timeout_s: collective timeout in seconds (``--collective-timeout``): the process group's
            timeout, so a collective that a peer never joins fails after this; and each worker's
            watchdog stops a worker that makes no progress (a step, an evaluation, a checkpoint
            write) for 1.5x this, saving its stack in ``watchdog-rank{R}.txt``
            (:mod:`gia_bench.train.watchdog`). A hang fails the run within 2x this.
        resume: continue from ``out/checkpoint.pt``.
        fewbit_backward: bits of Few-Bit Backward activations (:mod:`gia_bench.fewbit`); 0: exact.
        optimizer: ``sgd`` (momentum, weight decay), ``qcmd-adagrad`` or ``qrda-adagrad``
            (:mod:`gia_bench.optim`: AdaGrad with an L1 step; momentum and weight decay are SGD's only).
        l1: the L1 weight lambda of the adagrad optimizers (0: no sparsity pressure).
    """

    out: Path
    dataset: str = "digits"
    model: str = "resnet18"
    defense: str = "none"
    epochs: int = 3
    batch_size: int = 64
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    lr_warmup_steps: int | None = None
    warmup_steps: int | None = None
    collective: str | None = None
    capture_every: int = 0
    capture_steps: tuple[int | str, ...] = ()
    capture_ranks: tuple[int, ...] = (0,)
    seed: int = 0
    nproc_per_node: int = 1
    nnodes: str = "1"
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bucket_cap_mb: float = 25.0
    max_steps_per_epoch: int | None = None
    data_root: Path | None = None
    download: bool = False
    threads_per_worker: int | None = None
    timeout_s: float = 300.0
    resume: bool = False
    fewbit_backward: int = 0
    optimizer: str = "sgd"
    l1: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "capture_steps", tuple(self.capture_steps))
        object.__setattr__(self, "capture_ranks", tuple(self.capture_ranks))
        if self.data_root is not None:
            object.__setattr__(self, "data_root", Path(self.data_root))
        if self.threads_per_worker is None:  # resolved here, once: the workers read the number from the config file
            from gia_bench.threads import choose_threads

            object.__setattr__(
                self, "threads_per_worker", choose_threads(self.nproc_per_node, ceiling=torch.get_num_threads())
            )

    # -- validation --------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the flag for a bad value."""
        positive = {
            "--epochs": self.epochs,
            "--batch-size": self.batch_size,
            "--nproc-per-node": self.nproc_per_node,
            "--threads-per-worker": self.threads_per_worker,
        }
        for flag, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be an integer >= 1, got {value!r}")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < 0:
            raise ConfigError(f"--lr-warmup-steps must be >= 0, got {self.lr_warmup_steps}")
        bad = [s for s in self.capture_steps if not (s == "end" or (isinstance(s, int) and not isinstance(s, bool) and s >= 0))]
        if bad:
            raise ConfigError(f'--capture-steps: {bad} are not optimizer steps >= 0 or "end"')
        if any(not isinstance(r, int) or r < 0 for r in self.capture_ranks):
            raise ConfigError(f"capture_ranks: {list(self.capture_ranks)} are not worker ranks >= 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"--backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        from gia_bench.optim import OPTIMIZERS

        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not self.l1 >= 0 or not math.isfinite(self.l1):
            raise ConfigError(f"--l1 must be a finite number >= 0, got {self.l1}")
        if self.l1 and self.optimizer == "sgd":
            raise ConfigError("--l1 needs --optimizer qcmd-adagrad or qrda-adagrad (SGD has no L1 step)")
        if not 0 <= self.fewbit_backward <= 8:
            raise ConfigError(f"--fewbit-backward must be 0 (exact) or 1..8 bits, got {self.fewbit_backward}")
        if self.capture_every < 0:
            raise ConfigError(f"--capture-every must be >= 0, got {self.capture_every}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"--max-steps-per-epoch must be >= 1, got {self.max_steps_per_epoch}")
        if not self.bucket_cap_mb > 0:
            raise ConfigError(f"--bucket-cap-mb must be > 0, got {self.bucket_cap_mb}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ConfigError(f"--collective-timeout must be a finite number of seconds > 0, got {self.timeout_s}")
        if self.backend == "nccl" and self.device == "cpu":
            raise ConfigError("--backend nccl needs --device cuda (nccl has no CPU tensors)")
        if (self.device == "cuda" or self.backend == "nccl") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device} / --backend {self.backend}: no CUDA GPU on this machine")
        _nnodes(self.nnodes)
        if _nnodes(self.nnodes)[1] > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"--nnodes {self.nnodes}: several machines need --rdzv-endpoint host:port")
        self.defense_spec()
        from gia_bench.data import DATASETS
        from gia_bench.models import MODELS

        DATASETS.kwargs_for(self.dataset)  # bad names / values raise SpecError here, not in a worker
        MODELS.kwargs_for(self.model)

    def defense_spec(self) -> str:
        """The compressor spec with ``warmup_steps`` / ``collective`` folded in (checked against its parameters)."""
        from gia_bench.defenses import DEFENSES
        from gia_bench.registry import Spec, describe_params, parse_spec

        spec = parse_spec(self.defense)
        cls = DEFENSES.get(spec.name)
        params = {p.name for p in describe_params(cls)}
        kwargs = dict(spec.kwargs)
        for flag, key, value in (
            ("--warmup-steps", "start_iter", self.warmup_steps),
            ("--collective", "collective", self.collective),
        ):
            if value is None:
                continue
            if key not in params:
                raise ConfigError(f"{flag}: defense {spec.name!r} has no parameter {key!r} to set")
            if key in kwargs and str(kwargs[key]) != str(value):
                raise ConfigError(f"{flag} {value} contradicts {key}={kwargs[key]} in --defense {self.defense!r}")
            kwargs[key] = str(value)
        text = str(Spec(spec.name, kwargs))
        DEFENSES.kwargs_for(text)  # raises SpecError for bad values now, not in a worker
        return text

    # -- the schedule and the captures, once the world size is known ----------------------------
    def peak_lr(self, world_size: int) -> float:
        """``lr``, or :func:`default_lr` of the global batch ``batch_size x world_size``."""
        return self.lr if self.lr is not None else default_lr(self.batch_size * world_size)

    def warmup(self, total_steps: int, steps_per_epoch: int | None = None) -> int:
        """Linear warm-up steps of a run of ``total_steps`` (``--lr-warmup-steps``, else :func:`default_warmup`)."""
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        return default_warmup(total_steps, steps_per_epoch)

    def steps_per_epoch(self, train_examples: int, world_size: int) -> int:
        """Optimizer steps per epoch: each worker's share (DistributedSampler, drop_last) in whole batches."""
        steps = (train_examples // world_size) // self.batch_size
        if self.max_steps_per_epoch is not None:
            steps = min(steps, self.max_steps_per_epoch)
        return steps

    def capture_plan(self, total_steps: int) -> tuple[int, ...]:
        """The steps ``capture_steps`` names (``"end"`` -> ``total_steps - 1``), sorted; raises for one past the end."""
        steps = {total_steps - 1 if s == "end" else int(s) for s in self.capture_steps}
        late = sorted(s for s in steps if s >= total_steps)
        if late:
            raise ConfigError(f"--capture-steps {late}: the run has only {total_steps} optimizer steps (0..{total_steps - 1})")
        return tuple(sorted(steps))

    # -- JSON ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["data_root"] = None if self.data_root is None else str(self.data_root)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"train config: unknown keys {unknown}")
        return cls(**data)


def _nnodes(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise ConfigError(f"--nnodes must be N or MIN:MAX, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ConfigError(f"--nnodes must be N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def load_data(config: TrainConfig) -> tuple[Any, Any]:
    """``(train, test)`` :class:`~gia_bench.data.ImageDataset` objects of ``config.dataset``."""
    from gia_bench.data import load_dataset

    root = config.data_root
    return (
        load_dataset(config.dataset, root=root, download=config.download, split="train"),
        load_dataset(config.dataset, root=root, download=config.download, split="test"),
    )


def planned_steps(config: TrainConfig, world_size: int | None = None) -> int:
    """Optimizer steps the run will take in all (``world_size``: default ``nproc_per_node x nnodes``).

    Reads the training split's length; a study uses it to name the records of ``"end"``.
    """
    from gia_bench.data import load_dataset

    if world_size is None:
        world_size = config.nproc_per_node * _nnodes(config.nnodes)[0]
    n = len(load_dataset(config.dataset, root=config.data_root, download=config.download, split="train"))
    return config.steps_per_epoch(n, world_size) * config.epochs
