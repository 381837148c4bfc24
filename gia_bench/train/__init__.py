"""The DDP trainer: any compressor as the communication hook, launched through torchrun.

``launch(TrainConfig(...))`` (or ``gia-bench train ...``) starts one worker per GPU
(or ``nproc_per_node`` CPU workers on gloo where there is no GPU) through
``torch.distributed.run``'s elastic agent; each worker runs :func:`run_worker`
(``python -m gia_bench.train CONFIG.json``)::

    gia-bench train --dataset digits --model resnet18 --defense lqsgd:rank=2 \
        --nproc-per-node 2 --epochs 3 --batch-size 64 --capture-steps 0,50,end --out runs/lq

The optimizer. Gradients are compressed raw: the hook
(:mod:`gia_bench.defenses.ddp`) reduces each worker's plain gradient, and SGD with
momentum and weight decay runs afterwards on the reduced ``.grad``, as PowerSGD's
paper does (Vogels et al. 2019, Algorithm 2: compress the gradient with error
feedback, then the momentum update on the decompressed aggregate). A warm-up of
uncompressed steps (PowerSGD's ``start_iter``) is ``warmup_steps``.

The learning rate. Unless ``lr`` is given, the peak is ``0.1 x global batch / 256``
(Goyal et al. 2017's linear scaling rule; global batch = ``batch_size`` x workers),
reached by a linear warm-up over ``lr_warmup_steps`` (default 5% of the run), then
cosine decay to 0 (:func:`~gia_bench.train.config.lr_at`). With these defaults ``none``
reaches >= 90% test accuracy on digits within 3 epochs for ``convnet:width=16``,
``resnet18`` and ``mlp`` (README, "Training"; ``benchmarks/train_defaults.py``).

What it writes in ``out``:

* ``metrics.json`` after every epoch, atomically (schema 1, ``kind: "train"``):
  per epoch train loss (mean over workers and steps), test accuracy (fraction in
  [0, 1], rank 0's model on the whole test split) and ``test_examples`` (its binomial
  standard error is ``sqrt(p(1-p)/n)``), ``step`` (optimizer steps done), the lr, bytes each worker sent through
  the hook (``Message.nbytes`` of its :class:`~gia_bench.comm.TorchCommunicator`,
  counted as the ring algorithms send them) and seconds; totals.
* ``checkpoint.pt`` after every epoch, atomically: model, optimizer, every rank's
  hook state (error feedback, warm-start Q, RNG) and RNG states, the metrics so far.
  Tensors and plain containers only; read back with ``weights_only=True``.
  ``resume=True`` continues from it bit-identically.
* ``records/step0000050.safetensors`` (+ truth file) at the ``capture_steps`` (and every
  ``capture_every`` steps): rank 0's messages of that step as sent, the weights before
  it, the public compressor state; its private residual in the truth file only. See
  :mod:`gia_bench.train.records`. ``metrics.json["records"]`` maps steps to files.

The package, one job a file: :mod:`.config` (``TrainConfig``, its validation, the
data), :mod:`.loop` (one worker's training loop, capture, metrics), :mod:`.checkpoint`
(checkpoint files, RNG state), :mod:`.progress` (rank 0's events: steps, epoch lines),
:mod:`.launch` (torchrun's elastic agent, failure attribution, the worker entry point),
:mod:`.watchdog` (a worker that makes no progress is stopped, its stack saved).
"""

from gia_bench.train.checkpoint import load_checkpoint
from gia_bench.train.config import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    FAIL_ENV,
    FAIL_EXIT_CODE,
    METRICS_FILE,
    PEER_LOST_EXIT_CODE,
    RECORDS_DIR,
    TrainConfig,
    TrainError,
    default_lr,
    default_warmup,
    load_data,
    lr_at,
    parse_capture_steps,
    planned_steps,
)
from gia_bench.train.launch import launch, main
from gia_bench.train.loop import run_worker

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "FAIL_ENV",
    "FAIL_EXIT_CODE",
    "METRICS_FILE",
    "PEER_LOST_EXIT_CODE",
    "RECORDS_DIR",
    "TrainConfig",
    "TrainError",
    "default_lr",
    "default_warmup",
    "lr_at",
    "parse_capture_steps",
    "planned_steps",
    "launch",
    "load_checkpoint",
    "load_data",
    "main",
    "run_worker",
]
