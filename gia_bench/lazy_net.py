"""A network built on first use, with the reason it cannot be built instead of a number from random weights."""

from __future__ import annotations

import torch


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
