"""The Compressor interface and the defense registry.

A compressor turns one worker's gradients into the messages it sends, through a
:class:`~gia_bench.comm.Communicator`, and returns the aggregate every worker uses::

    comp = gia_bench.defenses.create("lqsgd:rank=2")
    comm = LocalCommunicator()
    out = comp.step(grads, comm)        # aggregated grads, same shapes
    comm.messages                       # what went on the wire, each with .nbytes

The receiver's side of one worker's messages is :meth:`Compressor.decode` (what a
curious server observes as that worker's gradient). The compressor-aware attacker
uses :meth:`Compressor.simulate`, which maps a candidate gradient to the same
float views of the messages that :meth:`Compressor.message_values` computes from the
observed messages, so the two can be compared entry by entry.

Conventions every compressor follows:

* ``grads`` is a list of tensors, one per parameter in model order; ``keys`` (one
  hashable per tensor; default: the position) name the per-parameter state (error
  feedback, warm-start Q) so that a DDP hook can call ``step`` bucket by bucket.
* Few collectives per step: the messages of all tensors are concatenated into flat
  buffers (one per kind of message) and tagged with fixed names (``"P"``, ``"Q"``,
  ``"values"``...). Their layout follows from the shapes and the parameters, so
  :meth:`decode` needs the shapes and the messages, nothing else.
* Public state the receiver knows before the step (the previous round's Q, a shared
  seed) or computes during it (the summed P a multi-worker decode needs) is returned
  by :meth:`public_state` after ``step``; records save it.
* Private state of the worker that shapes its messages (its error-feedback residual
  ``e``: it sends ``C(g + e)``) is returned by :meth:`private_state` *before* ``step``;
  it goes to the truth file, never to a record. :meth:`simulate` takes it as
  ``private`` (the oracle view, an upper bound); without it the residual is taken as 0.
* Bytes are what is sent: packed codes as ``uint8`` tensors, fp32 scales, int32
  indices. Nothing is counted that is not in a message.
* Randomness comes from ``torch.Generator`` objects seeded from the ``seed``
  parameter and saved in :meth:`state_dict`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from gia_bench.comm import Communicator
from gia_bench.errors import CompressorError
from gia_bench.registry import Registry, canonical_spec

DEFENSES: Registry[Compressor] = Registry("defense", entry_point_group="gia_bench.defenses", base=lambda: Compressor)
register = DEFENSES.register


def create(spec: str, **overrides: Any) -> Compressor:
    """Build a compressor from a spec string such as ``"topk:ratio=0.01"``."""
    return DEFENSES.create(spec, **overrides)


class Compressor:
    """Base class of every gradient compressor (a *defense*)."""

    registry_name: ClassVar[str]
    #: True when :meth:`simulate` is implemented (the compressor-aware attack can run).
    supports_simulate: ClassVar[bool] = False
    #: True when the output of :meth:`simulate` is differentiable (exactly or straight-through).
    differentiable_simulate: ClassVar[bool] = True

    # -- the worker's side ------------------------------------------------------------
    def step(
        self,
        grads: Sequence[torch.Tensor],
        comm: Communicator,
        keys: Sequence[Hashable] | None = None,
    ) -> list[torch.Tensor]:
        """Send this worker's ``grads`` through ``comm``; return the aggregated gradients.

        The aggregate is the *mean* over workers, as DDP's default all-reduce hook
        gives, so that a learning rate means the same with any compressor.
        """
        raise NotImplementedError

    # -- the receiver's side ------------------------------------------------------------
    def decode(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """The gradient a receiver reconstructs from one worker's messages (float32)."""
        raise NotImplementedError

    def public_state(self) -> dict[str, torch.Tensor]:
        """Public inputs of the last :meth:`step` that the receiver knows (e.g. the Q it started from)."""
        return {}

    def private_state(self, keys: Sequence[Hashable], shapes: Sequence[torch.Size]) -> dict[str, torch.Tensor]:
        """This worker's private inputs to its *next* step on tensors ``keys`` of ``shapes`` (call before ``step``).

        ``{"residual": flat}``: the error-feedback residual ``e_{t-1}`` the step adds to the
        gradient, concatenated in gradient order (zeros where a tensor has none). Empty when
        the next step's messages are a function of its gradient and the public state alone.
        """
        return {}

    # -- the compressor-aware attacker's side -------------------------------------------
    def message_values(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Float views of the observed messages (e.g. dequantized codes), keyed like :meth:`simulate`."""
        raise NotImplementedError(f"{self.registry_name} has no compressor-aware view")

    def simulate(
        self,
        grads: Sequence[torch.Tensor],
        messages: Mapping[str, torch.Tensor],
        public: Mapping[str, torch.Tensor] | None = None,
        private: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """What this worker would send for candidate ``grads``, as float views (see :meth:`message_values`).

        Differentiable in ``grads`` where the compressor is (straight-through where it
        rounds). ``messages`` gives what the attacker may reuse from the observation
        (e.g. Top-k's index mask); ``public`` the public state (e.g. PowerSGD's Q);
        ``private`` the worker's :meth:`private_state` (only the oracle view has it;
        absent, an error-feedback residual is taken as zero).
        """
        raise NotImplementedError(f"{self.registry_name} has no compressor-aware view")

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise CompressorError(f"{self.registry_name}: unexpected state keys {sorted(state)}")

    @property
    def spec(self) -> str:
        """The spec string that rebuilds this compressor with the same parameters."""
        return canonical_spec(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


# -- state shared by several compressors ---------------------------------------------------------


class GeneratorState:
    """``state_dict`` for a compressor whose only state is its random generator ``self._gen``.

    ``self._gen`` may be None until the first step creates it on the gradients' device.
    """

    registry_name: ClassVar[str]
    seed: int
    _gen: torch.Generator | None

    def _generator(self, device: torch.device, rank: int) -> torch.Generator:
        """The generator, created at the first step on the gradients' device, seeded ``seed + rank``
        so that workers draw differently but reproducibly."""
        if self._gen is None:
            self._gen = make_generator(self.seed + rank, device)
        return self._gen

    def state_dict(self) -> dict[str, Any]:
        if self._gen is None:
            return {}
        return {"generator": generator_state(self._gen), "generator_device": str(self._gen.device)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state_keys(state, {"generator", "generator_device"}, self.registry_name)
        if "generator" in state:
            gen = torch.Generator(device=state.get("generator_device", "cpu"))
            gen.set_state(state["generator"].clone())
            self._gen = gen
        else:
            self._gen = None


class ResidualState:
    """``state_dict`` for a compressor whose only state is its error-feedback residuals ``self._residual``."""

    registry_name: ClassVar[str]
    _residual: dict[Hashable, torch.Tensor]

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: v.clone() for k, v in self._residual.items()}}

    def private_state(self, keys: Sequence[Hashable], shapes: Sequence[torch.Size]) -> dict[str, torch.Tensor]:
        return residual_vector(self._residual, keys, shapes)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state_keys(state, {"residuals"}, self.registry_name)
        self._residual = {k: v.clone() for k, v in state.get("residuals", {}).items()}


def check_state_keys(state: Mapping[str, Any], allowed: set[str], who: str) -> None:
    unknown = set(state) - allowed
    if unknown:
        raise CompressorError(f"{who}: unexpected state keys {sorted(unknown)}")


# -- helpers shared by compressors ------------------------------------------------------------


def resolve_keys(grads: Sequence[torch.Tensor], keys: Sequence[Hashable] | None) -> list[Hashable]:
    if keys is None:
        return list(range(len(grads)))
    if len(keys) != len(grads):
        raise ValueError(f"{len(keys)} keys for {len(grads)} gradients")
    return list(keys)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat buffer (an empty float32 tensor if there are none)."""
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Split a flat buffer back into tensors of ``shapes``."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if flat.numel() != sum(sizes):
        raise CompressorError(f"buffer of {flat.numel()} values cannot hold shapes totalling {sum(sizes)}")
    return [chunk.reshape(s) for chunk, s in zip(torch.split(flat, sizes), shapes)]


def generator_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def residual_vector(
    residuals: Mapping[Hashable, torch.Tensor], keys: Sequence[Hashable], shapes: Sequence[torch.Size]
) -> dict[str, torch.Tensor]:
    """``{"residual": flat}``: ``residuals[key]`` per tensor in gradient order, zeros where absent, fp32 on the CPU.

    Empty when no tensor has a residual (a fresh compressor: the message depends on the gradient alone).
    """
    if not any(k in residuals for k in keys):
        return {}
    parts = []
    for key, shape in zip(keys, shapes):
        n = int(torch.Size(shape).numel())
        e = residuals.get(key)
        if e is None or e.numel() != n:
            parts.append(torch.zeros(n))
        else:
            parts.append(e.detach().reshape(-1).to("cpu", torch.float32))
    return {"residual": torch.cat(parts) if parts else torch.zeros(0)}


def with_residual(
    grads: Sequence[torch.Tensor], private: Mapping[str, torch.Tensor] | None, who: str
) -> list[torch.Tensor]:
    """``g + e`` per tensor when ``private`` holds the worker's residual (the oracle view), else ``grads``.

    Error feedback sends ``C(g_t + e_{t-1})`` (Stich et al. 2018, Alg. 1; Karimireddy et al. 2019,
    Alg. 1; Vogels et al. 2019, Alg. 2), so with ``e`` known the simulation is exact.
    """
    if not private or "residual" not in private:
        return list(grads)
    e = private["residual"].reshape(-1)
    total = sum(g.numel() for g in grads)
    if e.numel() != total:
        raise CompressorError(f"{who}: private residual holds {e.numel()} values, the gradients {total}")
    parts = unflatten(e, [g.shape for g in grads])
    return [g + r.to(device=g.device, dtype=g.dtype) for g, r in zip(grads, parts)]


def check_messages(messages: Mapping[str, torch.Tensor], needed: Sequence[str], who: str) -> None:
    missing = [t for t in needed if t not in messages]
    if missing:
        raise CompressorError(f"{who}: messages {missing} missing (have {sorted(messages)})")
