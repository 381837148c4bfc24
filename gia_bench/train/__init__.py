"""The DDP trainer: any compressor as the communication hook, launched through torchrun.

``launch(TrainConfig(...))`` (or ``gia-bench train ...``) starts one worker per GPU
(or ``nproc_per_node`` CPU workers on gloo where there is no GPU) through
``torch.distributed.run``'s elastic agent; each worker runs :func:`run_worker`
(``python -m gia_bench.train CONFIG.json``)::

    gia-bench train --dataset digits --model resnet18 --defense lqsgd:rank=2 \
        --nproc-per-node 2 --epochs 3 --batch-size 64 --lr 0.1 --out runs/lq

The optimizer. Gradients are compressed raw: the hook
(:mod:`gia_bench.defenses.ddp`) reduces each worker's plain gradient, and SGD with
momentum and weight decay runs afterwards on the reduced ``.grad``, as PowerSGD's
paper does (Vogels et al. 2019, Algorithm 2: compress the gradient with error
feedback, then the momentum update on the decompressed aggregate). A warm-up of
uncompressed steps (PowerSGD's ``start_iter``) is ``warmup_steps``.

What it writes in ``out``:

* ``metrics.json`` after every epoch, atomically (schema 1, ``kind: "train"``):
  per epoch train loss (mean over workers and steps), test accuracy (fraction in
  [0, 1], rank 0's model on the whole test split), bytes each worker sent through
  the hook (``Message.nbytes`` of its :class:`~gia_bench.comm.TorchCommunicator`,
  counted as the ring algorithms send them) and seconds; totals.
* ``checkpoint.pt`` after every epoch, atomically: model, optimizer, every rank's
  hook state (error feedback, warm-start Q, RNG) and RNG states, the metrics so far.
  Tensors and plain containers only; read back with ``weights_only=True``.
  ``resume=True`` continues from it bit-identically.
* ``records/`` with ``capture_every=K``: every K steps a
  :class:`~gia_bench.records.GradientRecord` (+ truth file) of rank 0's step. See
  :func:`_capture` for exactly what the record holds.

The package, one job a file: :mod:`.config` (``TrainConfig``, its validation, the
data), :mod:`.loop` (one worker's training loop, capture, metrics), :mod:`.checkpoint`
(checkpoint files, RNG state), :mod:`.progress` (rank 0's bar / epoch lines),
:mod:`.launch` (torchrun's elastic agent, failure attribution, the worker entry point).
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
    load_data,
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
    "launch",
    "load_checkpoint",
    "load_data",
    "main",
    "run_worker",
]
