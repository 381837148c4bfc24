"""Gaussian noise after norm clipping, the mechanism of DP-SGD (Abadi et al. 2016), applied per batch."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from gia_bench.comm import Communicator
from gia_bench.defenses.base import (
    Compressor,
    GeneratorState,
    check_messages,
    flatten,
    register,
    unflatten,
)
from gia_bench.errors import SpecError


def clip_factor(norm: torch.Tensor, clip: float) -> torch.Tensor:
    """``min(1, clip / norm)`` without dividing by zero (an all-zero gradient keeps factor 1)."""
    return clip / torch.clamp(norm, min=clip)


@register("noise")
class GaussianNoise(GeneratorState, Compressor):
    """Clip the batch gradient to L2 norm `clip`, add N(0, (sigma*clip)^2) per entry, send fp32.

    The Gaussian mechanism of DP-SGD (Abadi et al. 2016, Algorithm 1): ``g <- g * min(1,
    C/||g||_2)`` then ``g + N(0, sigma^2 C^2 I)``, where ``sigma`` is the noise multiplier
    and ``C = clip``. Here the clipping is per *batch* (the whole gradient of one worker's
    step, all tensors together), not per example as in DP-SGD: it bounds what one
    worker's message reveals about its batch, and gives no per-example privacy guarantee.
    With ``clip <= 0`` nothing is clipped and the noise std is ``sigma`` itself. The noisy
    gradient goes out as one fp32 all-reduce (message ``"grads"``, like ``none``); the
    noise comes from a generator seeded with ``seed + rank`` that the receiver does not know.

    Compressor-aware view (:meth:`simulate`): the candidate clipped (differentiably) and no
    noise, since the attacker cannot know the draw; the observation is the noisy message.

    Args:
        sigma: noise multiplier (noise std is sigma * clip; sigma itself when clip <= 0), >= 0.
        clip: L2 norm the whole gradient is clipped to; <= 0 disables clipping.
        seed: seed of the noise generator (each worker adds its rank).
    """

    supports_simulate = True
    #: the output of an all-zero gradient is pure noise, not zero
    adds_noise = True

    def __init__(self, *, sigma: float = 0.01, clip: float = 1.0, seed: int = 0) -> None:
        if not sigma >= 0.0:
            raise SpecError(f"noise sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)
        self.clip = float(clip)
        self.seed = int(seed)
        self._gen: torch.Generator | None = None

    @property
    def std(self) -> float:
        """Standard deviation of the noise added to every entry."""
        return self.sigma * self.clip if self.clip > 0 else self.sigma

    def _clip(self, flat: torch.Tensor) -> torch.Tensor:
        if self.clip <= 0:
            return flat
        return flat * clip_factor(torch.linalg.vector_norm(flat), self.clip)

    # -- worker ------------------------------------------------------------------------------
    def step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        if not grads:
            return []
        shapes = [g.shape for g in grads]
        device = grads[0].device
        flat = self._clip(flatten([g.detach() for g in grads]).to(torch.float32))
        gen = self._generator(device, comm.rank)
        noise = torch.randn(flat.numel(), generator=gen, device=gen.device, dtype=torch.float32).to(device)
        flat = flat + self.std * noise
        comm.all_reduce(flat, "grads")
        flat.div_(comm.world_size)
        return [t.to(g.dtype) for t, g in zip(unflatten(flat, shapes), grads)]

    # -- receiver ------------------------------------------------------------------------------
    def decode(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        check_messages(messages, ["grads"], "noise")
        return unflatten(messages["grads"].to(torch.float32), shapes)

    def message_values(self, messages, shapes, public=None) -> dict[str, torch.Tensor]:
        check_messages(messages, ["grads"], "noise")
        return {"grads": messages["grads"].to(torch.float32)}

    def simulate(self, grads, messages, public=None) -> dict[str, torch.Tensor]:
        return {"grads": self._clip(flatten(list(grads)).to(torch.float32))}
