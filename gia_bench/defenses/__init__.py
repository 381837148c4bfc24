"""Gradient compressors (defenses), registered by name; ``create(spec)`` is the way in."""

import importlib
import pkgutil

from gia_bench.defenses.base import DEFENSES, Compressor, create, register

# Every module of this package registers its compressors when imported.
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["DEFENSES", "Compressor", "create", "register"]
