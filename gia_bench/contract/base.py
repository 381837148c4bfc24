"""What the battery runs on and reports: its gradients, the subject under test, a check and its
result, and the step / decode helpers every check uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses.base import Compressor
from gia_bench.errors import SpecError
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


def shapes_of(grads: Sequence[torch.Tensor]) -> list[torch.Size]:
    """The shapes ``decode`` is given: all a receiver knows of the gradient besides the messages."""
    return [g.shape for g in grads]


def run_step(comp: Compressor, grads: Sequence[torch.Tensor], keys: Sequence[Hashable] | None = None):
    """``comp.step`` on copies of ``grads`` (a step must not need to own them) with one recording worker:
    (outputs, the communicator holding the messages)."""
    comm = LocalCommunicator(record=True)
    out = comp.step([g.clone() for g in grads], comm, keys=keys)
    return out, comm


def close_to(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Every entry of ``a`` within ``rtol`` of ``b``'s largest magnitude (in float64)."""
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
    return close_to(flat_d, flat_o, rtol)


def first_difference(decoded: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> int:
    """The index of the first tensor where ``decoded`` and ``out`` differ (for a check's reason)."""
    for i, (d, o) in enumerate(zip(decoded, out)):
        if d.shape != o.shape or not close_to(d.detach().cpu().float(), o.detach().cpu().float(), 1e-4):
            return i
    return 0


def output_problem(grads: Sequence[torch.Tensor], out: Any) -> str:
    """Why ``out`` is not one finite tensor per gradient with its shape, dtype and device, or ""."""
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


def decode_step(comp: Compressor, comm: LocalCommunicator, grads: Sequence[torch.Tensor], public=None):
    """``comp.decode`` of the messages ``comm`` recorded for ``grads`` (public state: ``comp``'s now)."""
    public = comp.public_state() if public is None else public
    return comp.decode(messages_by_tag(comm.messages), shapes_of(grads), public)
