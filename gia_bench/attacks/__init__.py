"""Gradient-inversion attacks, registered by name; ``create(spec)`` is the way in."""

import importlib
import pkgutil

from gia_bench.attacks.base import ATTACKS, Attack, AttackError, Reconstruction, create, register

# Every module of this package registers its attacks and parts when imported.
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ATTACKS", "Attack", "AttackError", "Reconstruction", "create", "register"]

# Text attacks live with the text package (gia_bench.text); importing them registers them here.
import gia_bench.text.attacks_tokens  # noqa: E402,F401
import gia_bench.text.dager  # noqa: E402,F401
import gia_bench.text.tag  # noqa: E402,F401
