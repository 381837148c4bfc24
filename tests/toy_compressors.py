"""Third-party compressors for the audit tests, loaded as ``toy_compressors:Class``."""

import torch

from gia_bench.defenses.base import Compressor, check_messages, flatten, unflatten


class HalfSum(Compressor):
    """A well-behaved toy: fp32 all-reduce of half the gradient (the receiver doubles it).

    Args:
        scale: factor applied before sending.
    """

    supports_simulate = True

    def __init__(self, scale: float = 0.5):
        self.scale = scale

    def step(self, grads, comm, keys=None):
        flat = flatten(grads) * self.scale
        comm.all_reduce(flat, "half")
        return unflatten(flat / self.scale / comm.world_size, [g.shape for g in grads])

    def decode(self, messages, shapes, public=None):
        check_messages(messages, ["half"], "HalfSum")
        return unflatten(messages["half"] / self.scale, shapes)

    def message_values(self, messages, shapes, public=None):
        return {"half": messages["half"]}

    def simulate(self, grads, messages, public=None):
        return {"half": flatten(grads) * self.scale}


class WrongShapes(HalfSum):
    """A broken toy: returns the gradients flattened."""

    def step(self, grads, comm, keys=None):
        out = super().step(grads, comm, keys)
        return [o.reshape(-1) for o in out]


class Smuggler(HalfSum):
    """A broken toy: returns the full gradient but sends only its first tensor."""

    def step(self, grads, comm, keys=None):
        comm.all_reduce(grads[0].reshape(-1).clone(), "half")
        return [g.clone() for g in grads]

    def decode(self, messages, shapes, public=None):
        return [torch.zeros(s) for s in shapes]
