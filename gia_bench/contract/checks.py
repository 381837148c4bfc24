"""The checks on one instance: shapes, spec, docs, bytes, edge cases, determinism, aliasing, decode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.contract.base import (
    BATTERY_SHAPES,
    Subject,
    all_close,
    battery_grads,
    decode_step,
    edge_grads,
    first_difference,
    output_problem,
    run_step,
    shapes_of,
)


def check_shapes(s: Subject) -> str:
    """Outputs keep each gradient's shape, dtype and device, finite, in fp32 and fp64."""
    for dtype in (torch.float32, torch.float64):
        grads = battery_grads(1, dtype=dtype)
        out, _ = run_step(s.build(), grads)
        reason = output_problem(grads, out)
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
    out, comm = run_step(s.build(), grads)
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
        out, comm = run_step(comp, grads)
        reason = output_problem(grads, out)
        if reason:
            return reason + " (all-zero gradients)"
        if not getattr(type(comp), "adds_noise", False) and any(int(torch.count_nonzero(o)) for o in out):
            return "an all-zero gradient gave a non-zero output (set adds_noise = True if that is the defense)"
        if not all(bool(torch.isfinite(d).all()) for d in decode_step(comp, comm, grads)):
            return "decode of all-zero gradients has NaN or inf values"
    return ""


def check_awkward(s: Subject) -> str:
    """0-d, one-entry and non-contiguous gradients: right shapes, finite, decodable."""
    comp = s.build()
    for seed in range(2):
        grads = edge_grads(seed)
        out, comm = run_step(comp, grads)
        reason = output_problem(grads, out)
        if reason:
            return reason + " (0-d, one-entry and non-contiguous gradients)"
        if not all_close(decode_step(comp, comm, grads), out):
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
        out_a, comm_a = run_step(a, grads)
        out_b, comm_b = run_step(b, grads)
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
        out, comm = run_step(comp, grads)
        decoded = decode_step(comp, comm, grads)
        if len(decoded) != len(out):
            return f"decode returned {len(decoded)} tensors for {len(out)} gradients"
        for i, (d, o) in enumerate(zip(decoded, out)):
            if d.shape != o.shape or d.dtype != torch.float32:
                return f"decode of tensor {i} is {d.dtype} {tuple(d.shape)}, expected float32 {tuple(o.shape)}"
        if not all_close(decoded, out):
            return (
                f"decode(messages) differs from step's output (step {seed}, tensor {first_difference(decoded, out)}):"
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
        out, comm = run_step(comp, grads)
        steps.append((seed, grads, out, messages_by_tag(comm.messages), comp.public_state()))
    run_step(s.build(), battery_grads(99))
    for seed, grads, out, messages, public in steps:
        receiver = s.from_spec_string(comp.spec)
        try:
            decoded = receiver.decode(messages, shapes_of(grads), public)
        except Exception as exc:  # a plug-in's decode may fail in any way; this is the finding
            return (
                f"decode on a fresh instance rebuilt from {comp.spec!r}, given only the counted messages and the"
                f" public state, raised {type(exc).__name__}: {exc}; decode relies on state kept on the worker's"
                " instance, which the receiver does not have"
            )
        if not all_close(decoded, out):
            return (
                f"decode on a fresh instance rebuilt from {comp.spec!r}, given only the counted messages and the"
                f" public state, does not give step's output (step {seed}, tensor {first_difference(decoded, out)}):"
                " decode relies on state kept on the worker's instance, which the receiver does not have"
            )
    return ""
