"""Half precision: gradients cast to fp16 before the all-reduce (as PyTorch's fp16_compress_hook)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from gia_bench.comm import Communicator
from gia_bench.defenses.base import Compressor, check_messages, flatten, register, unflatten


def _half_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.to(torch.float16).to(x.dtype) - x).detach()


@register("fp16")
class FP16(Compressor):
    """Gradients sent as fp16 (2 bytes per value), divided by the world size before the sum."""

    supports_simulate = True

    def step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        flat = flatten(grads)
        # Dividing first keeps the fp16 sum in range, as PyTorch's fp16_compress_hook does.
        half = flat.div(comm.world_size).to(torch.float16)
        comm.all_reduce(half, "grads")
        return [t.to(g.dtype) for t, g in zip(unflatten(half, [g.shape for g in grads]), grads)]

    def decode(self, messages: Mapping[str, torch.Tensor], shapes: Sequence[torch.Size], public=None):
        check_messages(messages, ["grads"], "fp16")
        return unflatten(messages["grads"].to(torch.float32), shapes)

    def message_values(self, messages, shapes, public=None) -> dict[str, torch.Tensor]:
        check_messages(messages, ["grads"], "fp16")
        return {"grads": messages["grads"].to(torch.float32)}

    def simulate(self, grads, messages, public=None) -> dict[str, torch.Tensor]:
        return {"grads": _half_ste(flatten(grads).to(torch.float32))}
