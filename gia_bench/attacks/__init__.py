"""Gradient-inversion attacks, registered by name; ``create(spec)`` is the way in."""

import importlib
import pkgutil

from gia_bench.attacks.base import ATTACKS, Attack, AttackError, Reconstruction, create, register

# Every module of this package registers its attacks and parts when imported.
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ATTACKS", "Attack", "AttackError", "Reconstruction", "create", "register"]
