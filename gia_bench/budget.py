"""What attacking a record will cost, estimated from its metadata before anything is allocated.

A record inside every bound of :mod:`gia_bench.records` can still ask for far more than a
machine has: ``MAX_INPUT_ELEMENTS`` bounds the input batch, not the model's activations
(a ResNet-18 record at 3 x 4096 x 4096 has 256 MiB of input and ~110 GiB of activations
per example), nor the work of a FedAvg record whose attack differentiates through every
simulated local step. So before an attack runs, :func:`check_attack` estimates

1. the model's activations per example: the model is built on the ``meta`` device and run
   once on one meta input, forward hooks summing the output elements of every leaf module
   plus the im2col columns of every convolution (nothing is allocated);
2. the examples forwarded at once: ``restarts x batch`` (a FedAvg record:
   ``restarts x local_steps x local_batch``, every simulated step stays in the graph);
3. the bytes, all fp32: ``ACTIVATION_FACTOR`` x activations x examples (the forward, the
   gradient kept differentiable, the double backward of gradient matching) + the parameters
   ``WEIGHT_COPIES`` times per restart and simulated step (an analytic attack, with no iterations:
   ``ANALYTIC_WEIGHT_COPIES``, the weights and the decoded gradient) + ``INPUT_COPIES`` x the candidate
   inputs (L-BFGS: + 2 x ``history_size``, its curvature pairs) + ``OVERHEAD_BYTES``;

and refuses, with one line naming the file, the estimate and ``--max-memory``, a record
whose estimate exceeds the bound (:data:`DEFAULT_MAX_MEMORY`, 2 GiB, raised with the flag),
or a FedAvg record that simulates more than :data:`MAX_LOCAL_EXAMPLES` examples per update
(the time bound: every attack iteration repeats that many forward and double-backward passes).

The factors come from the peak RSS growth of a few iterations of real ``ig`` and ``dlg``
attacks on CPU (LeNet, ConvNet, ResNet-18; 32 to 128 px; batch 1 to 64; FedAvg 5 x 4 and
20 x 8), rounded up: every measured peak was below the estimate, by 1.4x (LeNet, 128 px,
DLG) to 7x (ResNet-18, whose CPU convolutions build no im2col columns). It is a guard
against records that cannot fit, not an exact figure.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from gia_bench.errors import ConfigError, GiaBenchError, RecordError, SpecError

#: The memory an attack may use unless ``--max-memory`` raises it (bytes).
DEFAULT_MAX_MEMORY = 2 * 1024**3
#: Examples one simulated FedAvg update may process (local_steps x local_batch): the attack
#: repeats them, forward and double backward, at every iteration. As many as MAX_BATCH.
MAX_LOCAL_EXAMPLES = 4096
#: Bytes per value: attacks run in fp32.
BYTES_PER_ELEMENT = 4
#: Bytes at the peak of a gradient-matching step per forward activation byte (the forward, the
#: gradient kept differentiable, the double backward). Measured peak / activation term on CPU:
#: 0.5 (ResNet-18, 64 px, batch 8) to 2.1 (LeNet, 128 px, batch 64); rounded up.
ACTIVATION_FACTOR = 3
#: Copies of the parameters per restart and simulated step (weights, gradient, its gradient).
WEIGHT_COPIES = 3
#: The same for an analytic attack (no iterations: it reads the record and never differentiates
#: through a gradient), which holds the weights and the decoded gradient: a 135M-parameter
#: decoder (smollm2) is then 1.3 GiB, not 3.3.
ANALYTIC_WEIGHT_COPIES = 1
#: Copies of the candidate inputs (inputs, gradient, two optimiser moments, best iterate, slack);
#: L-BFGS adds 2 x history_size (:meth:`AttackNeeds.of`).
INPUT_COPIES = 8
#: What the process adds whatever the record (allocator pools, kernels' workspaces; measured).
OVERHEAD_BYTES = 256 * 1024**2

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_memory(text: str | int, flag: str = "--max-memory") -> int:
    """Bytes from ``"4GiB"``, ``"1500MB"``, ``"3e9"`` or an int; a bad value is one
    :class:`SpecError` naming ``flag``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise SpecError(f"{flag} {text!r}: expected a size such as 4GiB, 1500MB or 3e9 (bytes)")
        value = float(match.group(1)) * _UNITS[unit]
    if not (math.isfinite(value) and value >= 1):
        raise SpecError(f"{flag} {text!r}: must be a positive size")
    return int(value)


def format_bytes(n: float) -> str:
    """``2147483648`` -> ``"2.0 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _exact(model_spec: Any) -> Any:
    """The model with its exact backward: Few-Bit Backward keeps less than the activations it
    replaces (so the exact model bounds it), and its tables are cached per process, so they must
    never be first built on the meta device."""
    if getattr(model_spec, "fewbit_backward", 0):
        return dataclasses.replace(model_spec, fewbit_backward=0)
    return model_spec


def activation_elements(model_spec: Any) -> int | None:
    """Output elements of every leaf module for one example of ``model_spec.in_shape`` (meta device),
    plus the im2col columns of every convolution (``in_channels / groups x kernel`` per output position).

    None when the model cannot run on the meta device (a plug-in with data-dependent
    control flow): the estimate then counts parameters and inputs only.
    """
    import torch

    from gia_bench.models import build_model

    total = 0

    def count(module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel()
                if isinstance(module, torch.nn.modules.conv._ConvNd):
                    # the im2col columns a CPU convolution (and the unfold route) builds for backward:
                    # in_channels / groups x kernel values per output position
                    taps = module.in_channels // module.groups * math.prod(module.kernel_size)
                    total += taps * (t.numel() // module.out_channels)

    try:
        with torch.device("meta"):
            model = build_model(_exact(model_spec), seed=None, device=None)
            hooks = [m.register_forward_hook(count) for m in model.modules() if not any(True for _ in m.children())]
            with torch.no_grad():
                model(torch.empty(1, *model_spec.in_shape))
    except GiaBenchError:
        raise
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # meta tensors hold no data
        return None
    for hook in hooks:
        hook.remove()
    return total


@dataclasses.dataclass(frozen=True)
class AttackNeeds:
    """What an attack holds per record: ``restarts`` random starts, ``input_copies`` of its candidate inputs."""

    restarts: int = 1
    input_copies: int = INPUT_COPIES
    weight_copies: int = WEIGHT_COPIES

    @classmethod
    def of(cls, attack: Any) -> AttackNeeds:
        """The needs of an :class:`~gia_bench.attacks.Attack`: its budget's restarts; L-BFGS keeps
        ``2 x history_size`` more copies of the inputs (its curvature pairs); an analytic attack (0
        iterations) :data:`ANALYTIC_WEIGHT_COPIES` of the parameters."""
        config = getattr(attack, "config", None)
        copies = INPUT_COPIES
        if getattr(config, "optimizer", None) == "lbfgs":
            copies += 2 * int(getattr(config, "history_size", 100))
        weights = ANALYTIC_WEIGHT_COPIES if int(attack.budget.iterations) == 0 else WEIGHT_COPIES
        return cls(max(1, int(attack.budget.restarts)), copies, weights)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """What an attack on one record holds at its peak, in elements and bytes (fp32)."""

    activations_per_example: int | None  # None: the model does not run on the meta device
    parameters: int
    examples: int  # forwarded at once: restarts x batch, or restarts x local_steps x local_batch
    weight_copies: int  # restarts x simulated steps
    input_elements: int  # restarts x batch x C x H x W
    input_copies: int = INPUT_COPIES
    param_copies: int = WEIGHT_COPIES  # of the parameters per restart and step (AttackNeeds.weight_copies)

    @property
    def activation_bytes(self) -> int:
        return ACTIVATION_FACTOR * BYTES_PER_ELEMENT * (self.activations_per_example or 0) * self.examples

    @property
    def total(self) -> int:
        weights = self.param_copies * BYTES_PER_ELEMENT * self.parameters * (1 + self.weight_copies)
        inputs = self.input_copies * BYTES_PER_ELEMENT * self.input_elements
        return OVERHEAD_BYTES + self.activation_bytes + weights + inputs

    def describe(self) -> str:
        acts = "unknown" if self.activations_per_example is None else f"{self.activations_per_example:,}"
        return (f"~{format_bytes(self.total)} ({acts} activation values per example x {self.examples:,}"
                f" example(s) at once, {self.parameters:,} parameters)")


def estimate_memory(
    model: Any,
    batch_size: int,
    needs: AttackNeeds = AttackNeeds(),
    local_steps: int = 1,
    local_batch: int | None = None,
) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of an attack with ``needs`` on a batch of ``batch_size`` inputs to
    ``model`` (a :class:`~gia_bench.records.ModelSpec`), for a FedAvg update of ``local_steps`` steps of
    ``local_batch`` examples (1 step of the whole batch: FedSGD). Builds the model on the meta device only."""
    import torch

    from gia_bench.models import build_model

    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_model(_exact(model), seed=None, device=None).parameters())
    c, h, w = model.in_shape
    per_step = batch_size if local_batch is None else local_batch
    return MemoryEstimate(
        activations_per_example=activation_elements(model),
        parameters=int(parameters),
        examples=needs.restarts * local_steps * per_step,
        weight_copies=needs.restarts * local_steps,
        input_elements=needs.restarts * batch_size * c * h * w,
        input_copies=needs.input_copies,
        param_copies=needs.weight_copies,
    )


def estimate_record(meta: Any, needs: AttackNeeds = AttackNeeds()) -> MemoryEstimate:
    """:func:`estimate_memory` of a record's metadata (:class:`~gia_bench.records.RecordMeta`)."""
    if meta.is_fedsgd:
        return estimate_memory(meta.model, meta.batch_size, needs)
    return estimate_memory(meta.model, meta.batch_size, needs, meta.local_steps, meta.local_batch)


def check_local_work(local_steps: int, local_batch: int, where: str) -> None:
    """Refuse a FedAvg setting that simulates more than :data:`MAX_LOCAL_EXAMPLES` examples per update."""
    if local_steps * local_batch > MAX_LOCAL_EXAMPLES:
        raise SpecError(
            f"{where}: local_steps {local_steps} x local_batch {local_batch} = {local_steps * local_batch:,}"
            f" simulated examples per update, more than the {MAX_LOCAL_EXAMPLES:,} an attack repeats per iteration"
        )


def check_attack(meta: Any, attack: Any, max_memory: int = DEFAULT_MAX_MEMORY,
                 where: Path | str = "") -> MemoryEstimate:
    """Refuse an attack on the record ``meta`` before anything is allocated: one :class:`RecordError`
    naming ``where``, the estimate and ``--max-memory`` when it would need more than ``max_memory``
    bytes, or when the record simulates more FedAvg examples per update than :data:`MAX_LOCAL_EXAMPLES`.

    ``attack``: an :class:`~gia_bench.attacks.Attack` or its :class:`AttackNeeds`.
    """
    where = where or meta.record_id
    if not meta.is_fedsgd:
        try:
            check_local_work(meta.local_steps, meta.local_batch, str(where))
        except SpecError as exc:
            raise RecordError(str(exc)) from None
    needs = attack if isinstance(attack, AttackNeeds) else AttackNeeds.of(attack)
    estimate = estimate_record(meta, needs)
    refuse_over(estimate, needs, max_memory, where, RecordError)
    return estimate


def refuse_over(estimate: MemoryEstimate, needs: AttackNeeds, max_memory: int, where: Path | str,
                error: type[GiaBenchError] = RecordError) -> None:
    """Raise ``error`` (one line naming ``where``, the estimate and ``--max-memory``) if ``estimate``
    exceeds ``max_memory``."""
    if estimate.total > max_memory:
        raise error(
            f"{where}: an attack with {needs.restarts} restart(s) needs {estimate.describe()}, more than"
            f" --max-memory {format_bytes(max_memory)}; raise --max-memory if this machine has it"
        )


def check_study(config: Any, max_memory: int = DEFAULT_MAX_MEMORY, where: Path | str = "<study>") -> None:
    """Every attack on every cell of a study (:class:`~gia_bench.study.StudyConfig`) fits ``max_memory``,
    checked before any unit runs; one :class:`ConfigError` naming the cell otherwise.

    A cell's input shape is its data set's ``channels`` x ``size`` x ``size`` (every built-in
    data set has them); for a data set without them, each attack unit checks its record.
    """
    from gia_bench.attacks import create as create_attack
    from gia_bench.data import DATASETS
    from gia_bench.records import ModelSpec

    cells = [(d, m, b, config.attacks, config.model_mode, config.fewbit_backward)
             for d in config.datasets for m in config.models for b in config.batch_sizes]
    plan = config.train
    if plan is not None and plan.attack_steps:
        base = plan.base  # the TrainConfig the runs share ([train] overrides)
        cells.append((base.dataset, base.model, base.batch_size, plan.attacks or config.attacks, "train",
                      base.fewbit_backward))
    needs = {a: AttackNeeds.of(create_attack(a)) for a in {a for cell in cells for a in cell[3]}}
    for dataset, model, batch, attacks, mode, fewbit in cells:
        source = DATASETS.create(dataset)
        channels, size = getattr(source, "channels", None), getattr(source, "size", None)
        if not (isinstance(channels, int) and isinstance(size, int)):
            continue
        spec = ModelSpec(model, (channels, size, size), int(getattr(source, "num_classes", 10)), mode, fewbit)
        for attack in attacks:
            estimate = estimate_memory(spec, batch, needs[attack])
            refuse_over(estimate, needs[attack], max_memory,
                        f"{where}: {dataset} x {model} x batch {batch} x {attack}", ConfigError)
