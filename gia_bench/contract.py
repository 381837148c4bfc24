"""The compressor contract: one battery of checks for every compressor, built-in or plug-in.

pytest runs it on every registered compressor (``tests/defenses/test_all_compressors.py``,
parametrised by compressor and check) and ``gia-bench audit module:Class`` runs it on a
third party's compressor before ranking it (:mod:`gia_bench.audit`). Each check returns
the reason it failed, or ``""``; a check that does not apply to a compressor (error
feedback on one without residuals, CUDA without a device) raises :class:`NotApplicable`.

What a receiver, an attacker and a byte count rely on, and so what the battery checks:

* ``step`` returns one tensor per gradient with the gradient's shape, dtype and device,
  finite, also for all-zero, 0-d, one-entry and non-contiguous gradients and for none;
* every message is a CPU tensor whose bytes are counted (tags unique, ``nbytes`` the
  tensor's size), and something is sent;
* two fresh instances from the same spec compute the same thing (randomness comes from a
  ``torch.Generator`` seeded from the spec, saved in ``state_dict``);
* ``step`` leaves its input tensors untouched and returns new tensors, never the inputs;
* the output is what the counted messages carry: ``decode(messages, shapes, public)`` on
  a *fresh* instance rebuilt from the spec reproduces ``step``'s output, so nothing kept
  on the worker's instance reaches the receiver uncounted;
* the public state (:meth:`~gia_bench.defenses.base.Compressor.public_state`) is what the
  receiver knows before the step (the spec, the seeds, earlier messages): it never
  changes with the step's own gradient, which would let it carry that gradient for free;
* ``simulate`` and ``message_values`` agree in layout (the compressor-aware attack);
* ``state_dict`` / ``load_state_dict`` (through ``torch.save`` / ``torch.load(weights_only=True)``)
  resume bit-identically; error feedback delays, never drops
  (``sum_t output_t + e_T == sum_t g_t``);
* two workers over gloo compute the same aggregate, with ring byte counts.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import math
import socket
import tempfile
import traceback
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses.base import Compressor
from gia_bench.errors import GiaBenchError, SpecError
from gia_bench.registry import describe_params, summary

# A small model's gradient: conv weight, bias, a linear layer big enough for low-rank
# compressors to gain, its bias.
BATTERY_SHAPES: list[tuple[int, ...]] = [(16, 3, 5, 5), (16,), (10, 400), (10,)]


def battery_grads(
    seed: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """Gradients of ``BATTERY_SHAPES`` with per-tensor scales spread over 3 decades, as real ones are."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for i, shape in enumerate(BATTERY_SHAPES):
        scale = 10.0 ** (-(i % 4))
        grads.append((torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype))
    return grads


def edge_grads(seed: int) -> list[torch.Tensor]:
    """Awkward tensors: 0-d, one entry, non-contiguous (a transposed matrix), a 1-D tensor."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn((), generator=gen),
        torch.randn(1, generator=gen),
        torch.randn(24, 9, generator=gen).t(),  # 9 x 24, not contiguous
        torch.randn(7, generator=gen),
    ]


# -- the subject and the results --------------------------------------------------------------------


class NotApplicable(Exception):
    """Raised by a check that does not apply to this compressor (the reason says why)."""


@dataclasses.dataclass(frozen=True)
class Subject:
    """The compressor under test: its class and constructor arguments, as a spec resolved them.

    ``rebuild`` turns a spec string into a fresh instance, as a receiver does from a
    record's ``defense`` (default: the defense registry). The audit passes one that
    trusts the audited class, so its ``module:Class`` spec resolves.

    A plug-in (anything but a built-in name) is a ``remote`` subject: its module is
    imported only in a worker process (:mod:`gia_bench.audit_worker`), ``build`` returns
    proxies that forward to instances there (:mod:`gia_bench.remote`), and every check
    judges their answers here, where the plug-in cannot patch the checks.
    """

    cls: type | None
    kwargs: dict[str, Any]
    label: str
    rebuild: Callable[[str], Compressor] | None = None
    remote: Any = None  # gia_bench.remote.RemoteSubject

    @classmethod
    def from_spec(
        cls, spec: str, rebuild: Callable[[str], Compressor] | None = None, remote: bool | None = None,
        timeout_s: float = 120.0,
    ) -> Subject:
        """Resolve ``spec``; ``remote`` (default: unless it names a built-in) runs it in a worker process
        whose every answer must come within ``timeout_s`` seconds."""
        from gia_bench.defenses import DEFENSES
        from gia_bench.registry import parse_spec

        if remote is None:
            remote = not DEFENSES.is_builtin(parse_spec(spec).name)
        if remote:
            from gia_bench.remote import RemoteSubject

            return cls(None, {}, spec, None, RemoteSubject(spec, timeout_s))
        klass, kwargs = DEFENSES.kwargs_for(spec)
        if not (isinstance(klass, type) and issubclass(klass, Compressor)):
            raise SpecError(f"defense {spec!r}: {klass!r} is not a gia_bench Compressor subclass")
        return cls(klass, kwargs, spec, rebuild)

    def build(self) -> Compressor:
        """A fresh instance with the audited parameters."""
        if self.remote is not None:
            return self.remote.build()
        return self.cls(**self.kwargs)

    def from_spec_string(self, spec: str) -> Compressor:
        if self.remote is not None:
            return self.remote.rebuild(spec)
        if self.rebuild is not None:
            return self.rebuild(spec)
        from gia_bench.defenses import create

        return create(spec)

    def describe(self) -> tuple[str, str, list]:
        """(class name, docstring summary, :class:`~gia_bench.registry.Param` list) of the class under test."""
        if self.remote is not None:
            return self.remote.qualname, self.remote.summary, self.remote.params
        return self.cls.__qualname__, summary(self.cls), describe_params(self.cls)

    def close(self) -> None:
        """Stop the worker process of a remote subject (nothing to do for a local one)."""
        if self.remote is not None:
            self.remote.close()


@dataclasses.dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    reason: str = ""
    #: not run: it does not apply to this compressor, or a check it needs failed (``reason`` says which)
    skipped: bool = False


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Subject], str]
    #: checks that must pass first (else this one is skipped, so its reason cannot mislead)
    needs: tuple[str, ...] = ()
    #: spawns worker processes (seconds, not milliseconds)
    multiprocess: bool = False


# -- helpers ---------------------------------------------------------------------------------------------


def _shapes(grads: Sequence[torch.Tensor]) -> list[torch.Size]:
    return [g.shape for g in grads]


def _step(comp: Compressor, grads: Sequence[torch.Tensor], keys: Sequence[Hashable] | None = None):
    comm = LocalCommunicator(record=True)
    out = comp.step([g.clone() for g in grads], comm, keys=keys)
    return out, comm


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    a, b = a.to(torch.float64), b.to(torch.float64)
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-30)
    return bool(((a - b).abs() <= rtol * scale + 1e-12).all())


def all_close(decoded: Sequence[torch.Tensor], out: Sequence[torch.Tensor], rtol: float = 1e-5) -> bool:
    """Every tensor within ``rtol`` of the largest entry of the whole gradient.

    Compressors that quantize the concatenated buffer (one scale for all tensors) and
    GPUs (fused multiply-adds) move a decoded entry by an ulp of that global scale.
    """
    if len(decoded) != len(out):
        return False
    if not out:
        return True
    if any(d.shape != o.shape for d, o in zip(decoded, out)):
        return False
    flat_d = torch.cat([d.detach().cpu().reshape(-1) for d in decoded])
    flat_o = torch.cat([o.detach().cpu().reshape(-1) for o in out])
    return _close(flat_d, flat_o, rtol)


def _first_difference(decoded: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> int:
    for i, (d, o) in enumerate(zip(decoded, out)):
        if d.shape != o.shape or not _close(d.detach().cpu().float(), o.detach().cpu().float(), 1e-4):
            return i
    return 0


def _check_outputs(grads: Sequence[torch.Tensor], out: Any) -> str:
    if not isinstance(out, (list, tuple)) or len(out) != len(grads):
        length = len(out) if hasattr(out, "__len__") else "?"
        return f"step returned {type(out).__name__} of length {length}, expected a list of {len(grads)} tensors"
    for i, (g, o) in enumerate(zip(grads, out)):
        if not isinstance(o, torch.Tensor):
            return f"output {i} is {type(o).__name__}, not a tensor"
        if o.shape != g.shape:
            return f"output {i} has shape {tuple(o.shape)}, the gradient has {tuple(g.shape)}"
        if o.dtype != g.dtype:
            return f"output {i} has dtype {o.dtype}, the gradient has {g.dtype}"
        if o.device != g.device:
            return f"output {i} is on {o.device}, the gradient on {g.device}"
        if not bool(torch.isfinite(o).all()):
            return f"output {i} has NaN or inf values"
    return ""


def _decode(comp: Compressor, comm: LocalCommunicator, grads: Sequence[torch.Tensor], public=None):
    public = comp.public_state() if public is None else public
    return comp.decode(messages_by_tag(comm.messages), _shapes(grads), public)


# -- the checks --------------------------------------------------------------------------------------------


def check_shapes(s: Subject) -> str:
    """Outputs keep each gradient's shape, dtype and device, finite, in fp32 and fp64."""
    for dtype in (torch.float32, torch.float64):
        grads = battery_grads(1, dtype=dtype)
        out, _ = _step(s.build(), grads)
        reason = _check_outputs(grads, out)
        if reason:
            return reason + ("" if dtype == torch.float32 else " (float64 gradients)")
    return ""


def check_spec(s: Subject) -> str:
    """The spec string rebuilds the same compressor (class and parameters)."""
    comp = s.build()
    again = s.from_spec_string(comp.spec)
    if type(again) is not type(comp) or again.spec != comp.spec:
        return (
            f"spec {comp.spec!r} does not rebuild the same compressor"
            f" (it builds {type(again).__module__}:{type(again).__qualname__} with spec {again.spec!r})"
        )
    return ""


def check_documented(s: Subject) -> str:
    """The class docstring has a summary line and describes every parameter (``gia-bench list``)."""
    name, line, params = s.describe()
    if not line:
        return f"{name}: the class docstring needs a one-line summary"
    for p in params:
        if not p.help:
            return f"{name}: parameter {p.name!r} is not described in the docstring's Args: section"
    return ""


def check_bytes(s: Subject) -> str:
    """Every message is a CPU tensor, counted at its size; tags do not repeat; something is sent."""
    grads = battery_grads(0)
    out, comm = _step(s.build(), grads)
    if not comm.messages:
        return "step sent nothing: the output cannot reach another worker and no byte is counted"
    tags = [m.tag for m in comm.messages]
    if len(tags) != len(set(tags)):
        return f"message tags repeat: {tags}"
    total = 0
    for m in comm.messages:
        t = m.tensor
        if t is None or t.device.type != "cpu":
            return f"message {m.tag!r} was not recorded as a CPU tensor"
        if m.dtype != t.dtype or m.shape != tuple(t.shape):
            return f"message {m.tag!r} is logged as {m.dtype} {m.shape}, the tensor is {t.dtype} {tuple(t.shape)}"
        size = t.numel() * t.element_size()
        if not m.payload_nbytes == m.nbytes == size:
            return f"message {m.tag!r}: counted {m.nbytes} bytes (payload {m.payload_nbytes}), the tensor has {size}"
        total += size
    if comm.bytes_sent != total:
        return f"bytes_sent is {comm.bytes_sent}, the messages hold {total}"
    if total == 0 and any(bool(o.abs().sum() > 0) for o in out):
        return "the output is non-zero but no byte was sent (bytes would be under-counted)"
    return ""


def check_zeros(s: Subject) -> str:
    """All-zero gradients (twice, so the second step runs on the state the first left) give zero."""
    comp = s.build()
    grads = [torch.zeros(shape) for shape in BATTERY_SHAPES]
    for _ in range(2):
        out, comm = _step(comp, grads)
        reason = _check_outputs(grads, out)
        if reason:
            return reason + " (all-zero gradients)"
        if not getattr(type(comp), "adds_noise", False) and any(int(torch.count_nonzero(o)) for o in out):
            return "an all-zero gradient gave a non-zero output (set adds_noise = True if that is the defense)"
        if not all(bool(torch.isfinite(d).all()) for d in _decode(comp, comm, grads)):
            return "decode of all-zero gradients has NaN or inf values"
    return ""


def check_awkward(s: Subject) -> str:
    """0-d, one-entry and non-contiguous gradients: right shapes, finite, decodable."""
    comp = s.build()
    for seed in range(2):
        grads = edge_grads(seed)
        out, comm = _step(comp, grads)
        reason = _check_outputs(grads, out)
        if reason:
            return reason + " (0-d, one-entry and non-contiguous gradients)"
        if not all_close(_decode(comp, comm, grads), out):
            return "decode differs from the output on 0-d, one-entry and non-contiguous gradients"
    return ""


def check_empty(s: Subject) -> str:
    """An empty gradient list gives an empty list and sends nothing."""
    comm = LocalCommunicator()
    out = s.build().step([], comm)
    if out != []:
        return f"step([]) returned {out!r}, expected []"
    if comm.bytes_sent != 0:
        return f"step([]) sent {comm.bytes_sent} bytes"
    return ""


def check_deterministic(s: Subject) -> str:
    """Two fresh instances from the same spec send and return the same thing for the same gradients."""
    a, b = s.build(), s.build()
    for seed in range(3):
        grads = battery_grads(seed)
        out_a, comm_a = _step(a, grads)
        out_b, comm_b = _step(b, grads)
        same_out = all(torch.equal(x, y) for x, y in zip(out_a, out_b))
        same_msg = [m.tag for m in comm_a.messages] == [m.tag for m in comm_b.messages] and all(
            torch.equal(x.tensor, y.tensor) for x, y in zip(comm_a.messages, comm_b.messages)
        )
        if not (same_out and same_msg):
            what = "outputs" if not same_out else "messages"
            return (
                f"not deterministic: two fresh instances of the same spec give different {what} for the same"
                f" gradients (step {seed}); draw randomness from a torch.Generator seeded from a `seed`"
                " parameter and save it in state_dict"
            )
    return ""


def check_inputs_untouched(s: Subject) -> str:
    """``step`` does not modify its input tensors (the caller's gradients)."""
    comp = s.build()
    for seed in range(2):
        grads = battery_grads(seed)
        given = [g.clone() for g in grads]
        comp.step(given, LocalCommunicator(record=True), keys=None)
        for i, (g, h) in enumerate(zip(grads, given)):
            if not torch.equal(g, h):
                return f"step modified its input gradient {i} in place (the caller's gradients must stay as they were)"
    return ""


def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def output_aliases(inputs: Sequence[torch.Tensor], outputs: Any) -> list[tuple[int, int]]:
    """``(i, j)`` for every output ``i`` that shares memory with input ``j``."""
    spans = [_storage(g) for g in inputs]
    pairs = []
    for i, o in enumerate(outputs if isinstance(outputs, (list, tuple)) else []):
        if not isinstance(o, torch.Tensor):
            continue
        start, size = _storage(o)
        for j, (g_start, g_size) in enumerate(spans):
            if size and g_size and start < g_start + g_size and g_start < start + size:
                pairs.append((i, j))
    return pairs


def check_no_alias(s: Subject) -> str:
    """``step`` returns new tensors: no output shares memory with an input."""
    comp = s.build()
    grads = [g.clone() for g in battery_grads(0)]
    out = comp.step(grads, LocalCommunicator(record=True))
    for i, o in enumerate(out):
        if not isinstance(o, torch.Tensor):
            return f"output {i} is {type(o).__name__}, not a tensor"
    # memory is the worker's when the compressor runs there: it measured the overlaps
    pairs = comp.last_aliases if s.remote is not None else output_aliases(grads, out)
    if pairs:
        i, j = pairs[0]
        return (
            f"output {i} shares memory with input gradient {j}: step must return new tensors,"
            " not the inputs (or views of them)"
        )
    return ""


def check_decode(s: Subject) -> str:
    """Over three steps (error feedback, warm starts), decode of the messages is step's output."""
    comp = s.build()
    for seed in range(3):
        grads = battery_grads(seed)
        out, comm = _step(comp, grads)
        decoded = _decode(comp, comm, grads)
        if len(decoded) != len(out):
            return f"decode returned {len(decoded)} tensors for {len(out)} gradients"
        for i, (d, o) in enumerate(zip(decoded, out)):
            if d.shape != o.shape or d.dtype != torch.float32:
                return f"decode of tensor {i} is {d.dtype} {tuple(d.shape)}, expected float32 {tuple(o.shape)}"
        if not all_close(decoded, out):
            return (
                f"decode(messages) differs from step's output (step {seed}, tensor {_first_difference(decoded, out)}):"
                " the output carries information that the messages (and the byte count) do not"
            )
    return ""


def check_decode_fresh(s: Subject) -> str:
    """A fresh instance rebuilt from the spec decodes the counted messages and public state to the output.

    This is all a receiver has: decode must not read anything the worker's instance kept.
    The steps are decoded after all of them (and another instance's step on other
    gradients) ran, so state kept outside the instance (a global holding the last
    gradient) does not stand in either; the gloo check decodes in another process.
    """
    comp = s.build()
    steps = []
    for seed in range(3):
        grads = battery_grads(seed)
        out, comm = _step(comp, grads)
        steps.append((seed, grads, out, messages_by_tag(comm.messages), comp.public_state()))
    _step(s.build(), battery_grads(99))
    for seed, grads, out, messages, public in steps:
        receiver = s.from_spec_string(comp.spec)
        try:
            decoded = receiver.decode(messages, _shapes(grads), public)
        except Exception as exc:  # a plug-in's decode may fail in any way; this is the finding
            return (
                f"decode on a fresh instance rebuilt from {comp.spec!r}, given only the counted messages and the"
                f" public state, raised {type(exc).__name__}: {exc}; decode relies on state kept on the worker's"
                " instance, which the receiver does not have"
            )
        if not all_close(decoded, out):
            return (
                f"decode on a fresh instance rebuilt from {comp.spec!r}, given only the counted messages and the"
                f" public state, does not give step's output (step {seed}, tensor {_first_difference(decoded, out)}):"
                " decode relies on state kept on the worker's instance, which the receiver does not have"
            )
    return ""


def _public(comp: Compressor) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in comp.public_state().items()}


def check_public_state(s: Subject) -> str:
    """The public state after a step does not change with that step's gradient.

    It is what the receiver knows before the step: the spec, the seeds and what earlier
    messages carried (PowerSGD's warm-start Q, LAQ's stale copy). Two fresh instances with
    the same history and a different gradient at step ``t`` must report the same public
    state; otherwise it carries the step's gradient without a byte being counted.
    """
    for shared in (0, 2):  # the first step (spec and seeds only), then after two shared steps
        a, b = s.build(), s.build()
        for seed in range(shared):
            _step(a, battery_grads(seed))
            _step(b, battery_grads(seed))
        _step(a, battery_grads(10))
        _step(b, battery_grads(11))
        pa, pb = _public(a), _public(b)
        if sorted(pa) != sorted(pb):
            return f"public_state() keys change with the step's gradient ({sorted(pa)} vs {sorted(pb)})"
        for key in pa:
            if pa[key].shape != pb[key].shape or not torch.equal(pa[key], pb[key]):
                nbytes = pa[key].numel() * pa[key].element_size()
                return (
                    f"public_state()[{key!r}] after step {shared} changes with that step's gradient: the receiver"
                    f" cannot know it from the spec, the seeds and earlier messages, and its {nbytes} bytes are not"
                    " counted (send it as a message, or keep only public inputs there)"
                )
    return ""


def check_simulate(s: Subject) -> str:
    """``simulate`` gives the same float views as ``message_values``, differentiably where it claims to."""
    comp = s.build()
    if not comp.supports_simulate:
        return "cannot be attacked compressor-aware: implement simulate/message_values (supports_simulate = True)"
    grads = battery_grads(2)
    _, comm = _step(comp, grads)
    messages = messages_by_tag(comm.messages)
    observed = comp.message_values(messages, _shapes(grads), comp.public_state())
    candidate = [(g + 0.01).requires_grad_(True) for g in grads]
    simulated = comp.simulate(candidate, messages, comp.public_state())
    if not simulated or set(simulated) != set(observed):
        return f"simulate gives views {sorted(simulated)}, message_values {sorted(observed)}"
    for k in simulated:
        if simulated[k].shape != observed[k].shape:
            return f"simulate's {k!r} has shape {tuple(simulated[k].shape)}, message_values' {tuple(observed[k].shape)}"
    loss = sum(((simulated[k] - observed[k].to(simulated[k].dtype)) ** 2).sum() for k in simulated)
    if not bool(torch.isfinite(loss)):
        return "simulate or message_values gives NaN or inf values"
    if comp.differentiable_simulate:
        back = torch.autograd.grad(loss, candidate, allow_unused=True)
        if not any(b is not None and bool(b.abs().sum() > 0) for b in back):
            return "simulate carries no gradient (set differentiable_simulate = False if it cannot)"
        if not all(b is None or bool(torch.isfinite(b).all()) for b in back):
            return "the gradient through simulate has NaN or inf values"
    return ""


def _save_load(state: Any) -> Any:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def check_resume(s: Subject) -> str:
    """``state_dict`` (saved and loaded with ``weights_only=True``) resumes bit-identically."""
    comp = s.build()
    keys = [f"layer{i}" for i in range(len(BATTERY_SHAPES))]  # names, as the DDP hook passes them
    for seed in range(2):
        _step(comp, battery_grads(seed), keys)
    try:
        # a remote compressor's state makes the round trip in its worker (it may hold what is not data)
        state = comp.state_round_trip() if s.remote is not None else _save_load(copy.deepcopy(comp.state_dict()))
    except Exception as exc:  # an unpicklable state is the finding
        kind = getattr(exc, "remote_type", type(exc).__name__)
        return f"state_dict does not survive torch.save / torch.load(weights_only=True): {kind}: {exc}"
    later = [battery_grads(seed) for seed in range(2, 5)]
    ref = [_step(comp, g, keys) for g in later]
    resumed = s.build()
    resumed.load_state_dict(state)
    for t, (grads, (ref_out, ref_comm)) in enumerate(zip(later, ref)):
        out, comm = _step(resumed, grads, keys)
        if not all(torch.equal(a, b) for a, b in zip(out, ref_out)):
            return f"after load_state_dict the outputs differ (step {t + 1} after resuming)"
        if [m.tag for m in comm.messages] != [m.tag for m in ref_comm.messages] or not all(
            torch.equal(a.tensor, b.tensor) for a, b in zip(comm.messages, ref_comm.messages)
        ):
            return f"after load_state_dict the messages differ (step {t + 1} after resuming)"
    return ""


def error_feedback_gap(comp: Compressor, grad_steps: Sequence[Sequence[torch.Tensor]], rtol: float = 1e-5) -> str:
    """Run ``comp`` (one worker) over ``grad_steps``; the reason ``sum_t output_t + e_T != sum_t g_t``, or "".

    A tensor without a residual is one the compressor sends exactly.
    """
    total_in: list[torch.Tensor] | None = None
    total_out: list[torch.Tensor] | None = None
    for grads in grad_steps:
        keys = list(range(len(grads)))
        out = comp.step([g.clone() for g in grads], LocalCommunicator(record=False), keys=keys)
        if total_in is None:
            total_in = [torch.zeros_like(g, dtype=torch.float64) for g in grads]
            total_out = [torch.zeros_like(g, dtype=torch.float64) for g in grads]
        for ti, to, g, o in zip(total_in, total_out, grads, out):
            ti += g.double()
            to += o.double()
    if total_in is None or total_out is None:
        raise ValueError("no steps given")
    residuals = comp.state_dict().get("residuals")
    if not isinstance(residuals, dict):
        return "state_dict() has no 'residuals' dict after a step"
    for i, (ti, to) in enumerate(zip(total_in, total_out)):
        e = residuals[i].double().reshape(ti.shape) if i in residuals else torch.zeros_like(ti)
        err = float(torch.linalg.vector_norm(to + e - ti))
        if err > rtol * float(torch.linalg.vector_norm(ti)):
            return (
                f"error feedback loses part of tensor {i}: |sum outputs + residual - sum gradients| = {err:.3g}"
                " (error feedback must delay, never drop)"
            )
    return ""


def has_residuals(comp: Compressor) -> bool:
    """Whether ``comp`` keeps error feedback under ``state_dict()["residuals"]`` after a step."""
    _step(comp, battery_grads(0))
    return isinstance(comp.state_dict().get("residuals"), dict)


def check_error_feedback(s: Subject) -> str:
    """With error feedback (``state_dict()["residuals"]``), ``sum_t output_t + e_T == sum_t g_t``."""
    if not has_residuals(s.build()):
        raise NotApplicable("no error feedback: state_dict() holds no 'residuals'")
    return error_feedback_gap(s.build(), [battery_grads(seed) for seed in range(6)])


def check_cuda(s: Subject) -> str:
    """CUDA gradients: the output stays on the device, messages are recorded on the CPU."""
    if not torch.cuda.is_available():
        raise NotApplicable("no CUDA device")
    comp = s.build()
    for seed in range(2):
        grads = battery_grads(seed, device="cuda")
        out, comm = _step(comp, grads)
        reason = _check_outputs(grads, out)
        if reason:
            return reason + " (CUDA gradients)"
        if not all(m.tensor.device.type == "cpu" for m in comm.messages):
            return "a message of a CUDA step was not recorded on the CPU"
        if not all_close(_decode(comp, comm, grads), out):
            return "decode differs from the CUDA output"
    return ""


# -- two real processes over gloo ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, world_size: int, port: int, subjects: dict[str, tuple[type, dict]], out_dir: str) -> None:
    """Two steps of every subject through a TorchCommunicator; saves ``rank{rank}.pt``:
    ``{label: {"steps": [{"inputs", "out", "public", "messages"}, ...]} or {"error": traceback}}``.

    At module level because ``torch.multiprocessing.spawn`` pickles the worker by name; the
    subjects travel as (class, kwargs), so a plug-in needs no registry entry in the workers.
    """
    import torch.distributed as dist

    from gia_bench.comm import TorchCommunicator

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict[str, dict] = {}
    try:
        for label, (klass, kwargs) in subjects.items():
            try:
                comp = klass(**kwargs)
                steps = []
                for step in range(2):
                    grads = battery_grads(seed=1000 * step + rank)
                    comm = TorchCommunicator(record=True)
                    out = comp.step([g.clone() for g in grads], comm)
                    public = {k: v.detach().cpu().clone() for k, v in comp.public_state().items()}
                    # what this process decodes from its own messages, with a fresh instance
                    try:
                        own = klass(**kwargs).decode(
                            {m.tag: m.tensor for m in comm.messages}, [g.shape for g in grads], public
                        )
                    except Exception:  # noqa: BLE001  (nothing to compare against; see check_gloo_run)
                        own = None
                    steps.append(
                        {
                            "inputs": grads,
                            "out": [o.detach().clone() for o in out],
                            "decoded": None if own is None else [d.detach().cpu().clone() for d in own],
                            "public": public,
                            "messages": [
                                {
                                    "tag": m.tag,
                                    "op": m.op,
                                    "nbytes": m.nbytes,
                                    "payload_nbytes": m.payload_nbytes,
                                    "tensor": m.tensor,
                                }
                                for m in comm.messages
                            ],
                        }
                    )
                results[label] = {"steps": steps}
            except Exception:  # reported per compressor by check_gloo_run
                results[label] = {"error": traceback.format_exc()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def gloo_runs(subjects: dict[str, tuple[type, dict]], world_size: int = 2) -> list[dict[str, dict]]:
    """Spawn ``world_size`` gloo workers once for all ``subjects``; one result dict per rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="gia-bench-gloo-") as tmp:
        mp.spawn(_gloo_worker, args=(world_size, _free_port(), subjects, tmp), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


def ring_bytes(op: str, payload: int, n: int) -> int:
    """Bytes per worker of the bandwidth-optimal ring collectives (comm.py's accounting)."""
    return {
        "all_reduce": math.ceil(2 * (n - 1) * payload / n),
        "all_gather": (n - 1) * payload,
        "all_to_all": math.ceil((n - 1) * payload / n),
    }[op]


def check_gloo_run(runs: Sequence[dict], build: Callable[[], Compressor] | None = None) -> str:
    """The reason one compressor's runs (one per rank, from :func:`gloo_runs`) break the contract, or "".

    With ``build`` (fresh instances), each rank's messages are also decoded here, in a
    process that never saw that rank's gradient, and must give what the rank decoded
    itself: decode must not read a global or class attribute the step filled.
    """
    for rank, run in enumerate(runs):
        if "error" in run:
            return f"failed on rank {rank} of {len(runs)} gloo workers:\n{run['error']}"
    n = len(runs)
    if build is not None:
        for rank, run in enumerate(runs):
            for step, s in enumerate(run["steps"]):
                if s.get("decoded") is None:
                    # the worker could not decode its own multi-worker messages: no reference to compare
                    # with (the in-process checks hold decode to the output with one worker)
                    continue
                messages = {m["tag"]: m["tensor"] for m in s["messages"]}
                try:
                    here = build().decode(messages, [g.shape for g in s["inputs"]], s["public"])
                except Exception as exc:  # a plug-in's decode may fail in any way; this is the finding
                    here, error = None, f"{type(exc).__name__}: {exc}"
                if here is None or not all_close(here, s["decoded"], 1e-6):
                    return (
                        f"decode of rank {rank}'s messages (step {step}) in another process"
                        f" {'raised ' + error if here is None else 'differs from the one in its own process'}:"
                        " decode reads state the step left in its process (a global or class attribute),"
                        " which the receiver does not have"
                    )
    for step, per_rank in enumerate(zip(*(r["steps"] for r in runs))):
        # replicas stay in sync only if every rank computes exactly the same aggregate
        for rank_run in per_rank[1:]:
            if not all(torch.equal(a, b) for a, b in zip(per_rank[0]["out"], rank_run["out"])):
                return f"step {step}: the {n} gloo workers computed different aggregates (replicas would drift)"
        for rank, s in enumerate(per_rank):
            if not s["messages"]:
                return f"step {step}: rank {rank} sent nothing"
            for m in s["messages"]:
                t = m["tensor"]
                if m["payload_nbytes"] != t.numel() * t.element_size():
                    return f"step {step}: message {m['tag']!r} payload counted {m['payload_nbytes']} bytes, the tensor has {t.numel() * t.element_size()}"
                if m["nbytes"] != ring_bytes(m["op"], m["payload_nbytes"], n):
                    return f"step {step}: message {m['tag']!r} ({m['op']}) counted {m['nbytes']} wire bytes, the ring sends {ring_bytes(m['op'], m['payload_nbytes'], n)}"
    return ""


def check_gloo(s: Subject) -> str:
    """Two worker processes over gloo compute the same aggregate, with ring byte counts."""
    if s.remote is None:
        runs = gloo_runs({s.label: (s.cls, s.kwargs)})
        return check_gloo_run([r[s.label] for r in runs], s.build)
    # the worker spawns the two gloo processes; their messages are decoded in yet another worker,
    # which never ran a step (a receiver has nothing the workers' processes kept)
    runs = s.remote.gloo_runs()
    receiver = s.remote.fresh()
    try:
        return check_gloo_run(runs, receiver.build)
    finally:
        receiver.close()


#: The battery, in the order it runs. The gloo check runs last and only when every other passed.
CHECKS: tuple[Check, ...] = (
    Check("shapes, dtypes and finite values", check_shapes),
    Check("spec string round-trips", check_spec, ("shapes, dtypes and finite values",)),
    Check("documented", check_documented),
    Check("bytes are the recorded message tensors", check_bytes, ("shapes, dtypes and finite values",)),
    Check("all-zero gradients", check_zeros, ("shapes, dtypes and finite values",)),
    Check("awkward tensors", check_awkward, ("shapes, dtypes and finite values",)),
    Check("empty gradient list", check_empty),
    Check("deterministic", check_deterministic, ("shapes, dtypes and finite values",)),
    Check("inputs untouched", check_inputs_untouched, ("shapes, dtypes and finite values",)),
    Check("output does not alias the input", check_no_alias, ("shapes, dtypes and finite values",)),
    Check("output is what the messages carry", check_decode, ("shapes, dtypes and finite values",)),
    Check(
        "decode needs only the messages",
        check_decode_fresh,
        ("spec string round-trips", "output is what the messages carry"),
    ),
    Check("public state is known to the receiver", check_public_state, ("deterministic",)),
    Check("simulate matches message_values", check_simulate, ("shapes, dtypes and finite values",)),
    Check("state_dict resumes bit-identically", check_resume, ("deterministic",)),
    Check("error feedback loses nothing", check_error_feedback, ("shapes, dtypes and finite values",)),
    Check("CUDA gradients stay on the device", check_cuda, ("shapes, dtypes and finite values",)),
)
GLOO_CHECK = Check("two gloo workers agree", check_gloo, multiprocess=True)
CHECK_NAMES: tuple[str, ...] = tuple(c.name for c in CHECKS) + (GLOO_CHECK.name,)


def run_check(check: Check, subject: Subject) -> CheckResult:
    """One check; a plug-in's exception is its failure (with the exception as the reason)."""
    from gia_bench.remote import WorkerGone

    try:
        reason = check.run(subject)
    except NotApplicable as exc:
        return CheckResult(check.name, True, str(exc), skipped=True)
    except WorkerGone as exc:  # the plug-in's worker died or hung: the reason says which
        reason = str(exc)
    except GiaBenchError as exc:
        reason = str(exc) or type(exc).__name__
    except Exception as exc:  # a third-party compressor may fail in any way; the battery reports it
        # remote_type: the exception's type in the worker (gia_bench.remote.RemoteError)
        reason = f"raised {getattr(exc, 'remote_type', type(exc).__name__)}: {exc}"
    return CheckResult(check.name, not reason, reason)


def check_compressor(subject: Subject | str, multiprocess: bool = True) -> list[CheckResult]:
    """Run the battery on ``subject`` (a :class:`Subject` or a spec string); one result per check.

    A check whose prerequisite failed is skipped (``passed=False, skipped=True``) so that
    only the root cause carries a reason; the gloo check (``multiprocess``) runs only when
    every other check passed. Once a remote subject's worker is gone (it died or hung),
    the checks after the one that saw it go are skipped.
    """
    own = isinstance(subject, str)
    if own:
        subject = Subject.from_spec(subject)
    try:
        results: dict[str, CheckResult] = {}
        for check in (*CHECKS, GLOO_CHECK) if multiprocess else CHECKS:
            gone = subject.remote.gone if subject.remote is not None else None
            failed = [n for n in check.needs if n in results and not results[n].passed]
            if check is GLOO_CHECK and not all(r.passed for r in results.values()):
                results[check.name] = CheckResult(check.name, False, "not run: other checks failed", skipped=True)
            elif gone is not None:
                results[check.name] = CheckResult(check.name, False, "not run: the plug-in's worker is gone", skipped=True)
            elif failed:
                results[check.name] = CheckResult(check.name, False, f"not run: {failed[0]!r} failed", skipped=True)
            else:
                results[check.name] = run_check(check, subject)
        return list(results.values())
    finally:
        if own:
            subject.close()


def failures(results: Sequence[CheckResult]) -> list[CheckResult]:
    """The checks that failed for a reason of their own (not skipped because another failed)."""
    return [r for r in results if not r.passed and not r.skipped]
