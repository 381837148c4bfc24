"""Plain SGD: every gradient sent as fp32 and summed by all-reduce."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from gia_bench.comm import Communicator
from gia_bench.defenses.base import Compressor, check_messages, flatten, register, unflatten


@register("none")
class NoCompression(Compressor):
    """Plain SGD: the full gradient, fp32, one all-reduce (the uncompressed baseline)."""

    supports_simulate = True

    def step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        flat = flatten(grads)
        comm.all_reduce(flat, "grads")
        flat.div_(comm.world_size)
        return unflatten(flat, [g.shape for g in grads])

    def decode(self, messages: Mapping[str, torch.Tensor], shapes: Sequence[torch.Size], public=None):
        check_messages(messages, ["grads"], "none")
        return unflatten(messages["grads"].to(torch.float32), shapes)

    def message_values(self, messages, shapes, public=None) -> dict[str, torch.Tensor]:
        check_messages(messages, ["grads"], "none")
        return {"grads": messages["grads"].to(torch.float32)}

    def simulate(self, grads, messages, public=None) -> dict[str, torch.Tensor]:
        return {"grads": flatten(grads).to(torch.float32)}
