"""Third-party compressors for the audit tests, loaded as ``audit_plugins:Class``.

Two valid plug-ins that subclass built-ins without registering a name (they must pass the
battery and keep ``audit_plugins:Class`` as their spec) and one cheat per rule of the
contract (each must fail the battery with its own reason, and only that one). The cheats
are built on :class:`Honest`, which keeps every rule, so the one thing each changes is
the one thing the battery must catch.
"""

import torch

from gia_bench.defenses.base import Compressor, check_messages, flatten, unflatten
from gia_bench.defenses.powersgd import PowerSGD
from gia_bench.defenses.topk import TopK

# -- valid: subclasses of built-ins loaded as module:Class ----------------------------------------------


class Mine(TopK):
    """Top-k, unchanged, under a third party's name."""


class Warmer(PowerSGD):
    """PowerSGD with a rank-2 default (a third party's preset).

    Args:
        rank: rank of the low-rank approximation.
        seed: seed of the initial Q.
    """

    def __init__(self, rank: int = 2, seed: int = 0) -> None:
        super().__init__(rank=rank, seed=seed)


# -- the honest base of the cheats -----------------------------------------------------------------------


class Honest(Compressor):
    """fp32 all-reduce of a scaled gradient; the receiver divides the scale out.

    Args:
        scale: factor applied before sending.
    """

    supports_simulate = True

    def __init__(self, scale: float = 0.5):
        self.scale = scale

    def step(self, grads, comm, keys=None):
        flat = flatten(grads) * self.scale
        comm.all_reduce(flat, "scaled")
        return unflatten(flat / self.scale / comm.world_size, [g.shape for g in grads])

    def decode(self, messages, shapes, public=None):
        check_messages(messages, ["scaled"], "Honest")
        return unflatten(messages["scaled"].to(torch.float32) / self.scale, shapes)

    def message_values(self, messages, shapes, public=None):
        return {"scaled": messages["scaled"].to(torch.float32)}

    def simulate(self, grads, messages, public=None):
        return {"scaled": flatten(grads).to(torch.float32) * self.scale}


# -- (a) decode reads what the worker's instance kept ------------------------------------------------------


class InstanceMemo(Honest):
    """Sends 4 bytes (the gradient's sum) and decodes from a copy kept on the instance."""

    def __init__(self, scale: float = 0.5):
        super().__init__(scale)
        self._memo = None

    def step(self, grads, comm, keys=None):
        if not grads:
            return []
        flat = flatten(grads)
        comm.all_reduce(flat.sum().reshape(1), "sum")
        self._memo = flat.detach().to(torch.float32).clone()
        return unflatten(flat.clone(), [g.shape for g in grads])

    def decode(self, messages, shapes, public=None):
        check_messages(messages, ["sum"], "InstanceMemo")
        memo = self._memo if self._memo is not None else torch.zeros(sum(torch.Size(s).numel() for s in shapes))
        return unflatten(memo.clone(), shapes)

    def message_values(self, messages, shapes, public=None):
        return {"sum": messages["sum"].to(torch.float32)}

    def simulate(self, grads, messages, public=None):
        return {"sum": flatten(grads).to(torch.float32).sum().reshape(1)}


class GlobalMemo(InstanceMemo):
    """Sends 4 bytes (the gradient's sum) and decodes from a table of every gradient, kept in the module."""

    def step(self, grads, comm, keys=None):
        out = super().step(grads, comm, keys)
        if grads:
            _TABLE[float(flatten(grads).sum())] = self._memo
        return out

    def decode(self, messages, shapes, public=None):
        check_messages(messages, ["sum"], "GlobalMemo")
        memo = _TABLE.get(float(messages["sum"].reshape(-1)[0]))
        if memo is None:
            memo = torch.zeros(sum(torch.Size(s).numel() for s in shapes))
        return unflatten(memo.clone(), shapes)


_TABLE: dict[float, torch.Tensor] = {}


# -- (b) the gradient travels in public_state(), whose bytes are not counted --------------------------------


class PublicSmuggler(InstanceMemo):
    """Sends 4 bytes (the gradient's sum) and hands the gradient to the receiver as 'public' state."""

    def public_state(self):
        return {} if self._memo is None else {"g": self._memo.clone()}

    def decode(self, messages, shapes, public=None):
        check_messages(messages, ["sum"], "PublicSmuggler")
        return unflatten(public["g"].to(torch.float32).clone(), shapes)


# -- (c) step modifies the caller's gradients ---------------------------------------------------------------


class InPlace(Honest):
    """Scales the caller's gradient tensors in place before sending them."""

    def step(self, grads, comm, keys=None):
        for g in grads:
            g.mul_(self.scale)
        flat = flatten(grads)
        comm.all_reduce(flat, "scaled")
        return unflatten(flat / self.scale / comm.world_size, [g.shape for g in grads])


# -- (d) step returns the input tensors themselves ----------------------------------------------------------


class ReturnsInputs(Honest):
    """With one worker, returns the gradient tensors it was given (the mean of one is itself)."""

    def step(self, grads, comm, keys=None):
        out = super().step(grads, comm, keys)
        return list(grads) if comm.world_size == 1 else out


# -- nondeterminism -----------------------------------------------------------------------------------------------


class Jitter(Honest):
    """Adds noise drawn from torch's global generator (not a seeded one) before sending.

    Args:
        scale: factor applied before sending.
    """

    adds_noise = True

    def step(self, grads, comm, keys=None):
        flat = flatten(grads) * self.scale
        flat = flat + 1e-3 * torch.randn(flat.shape, dtype=flat.dtype)
        comm.all_reduce(flat, "scaled")
        return unflatten(flat / self.scale / comm.world_size, [g.shape for g in grads])
