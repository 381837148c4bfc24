"""Image-pair networks (LPIPS, ST-LPIPS): built on first use, with the reason they cannot be built instead
of a number from random weights, and the one way images are prepared for their trunks."""

from __future__ import annotations

import torch
from torch import Tensor


class LazyNet:
    """Builds ``_build()`` once, on first use; :attr:`available` and :attr:`reason` say how it went.

    Subclasses set :attr:`unavailable_errors` (the exceptions that mean "weights or package
    missing", turned into :attr:`reason`) and :meth:`_reason_for` (the message for one).
    """

    unavailable_errors: tuple[type[Exception], ...] = ()

    def __init__(self) -> None:
        self._model: torch.nn.Module | None = None
        self._reason: str | None = None
        self._built = False

    def _build(self) -> torch.nn.Module:
        raise NotImplementedError

    def _reason_for(self, exc: Exception) -> str:
        raise NotImplementedError

    def _ensure(self) -> torch.nn.Module | None:
        if not self._built:
            self._built = True
            try:
                self._model = self._build()
            except self.unavailable_errors as exc:
                self._reason = self._reason_for(exc)
        return self._model

    @property
    def available(self) -> bool:
        return self._ensure() is not None

    @property
    def reason(self) -> str | None:
        """Why the network cannot be built ("... unavailable: ..."), or None when it can."""
        self._ensure()
        return self._reason


def trunk_input(x01: Tensor, min_side: int, name: str) -> Tensor:
    """(B, C, H, W) in [0, 1] -> 3 channels in [-1, 1] for ``name``'s trunk; sides under ``min_side`` resized (bilinear).

    Resized before the affine map to [-1, 1], the order LPIPS's own ``normalize=True`` uses.
    """
    x = x01.detach().float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] != 3:
        raise ValueError(f"{name} needs 1 or 3 channels, got {x.shape[1]}")
    h, w = x.shape[-2:]
    if min(h, w) < min_side:
        s = min_side / min(h, w)
        size = (max(min_side, round(h * s)), max(min_side, round(w * s)))
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return 2 * x - 1
