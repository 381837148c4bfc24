"""The project's exception types.

Every user mistake (a bad spec, a corrupt record, a missing data folder) raises a
subclass of :class:`GiaBenchError` whose message names the input and what is wrong;
the CLI prints it as one red line and exits with code 2.
"""

from __future__ import annotations


class GiaBenchError(Exception):
    """Base of every error caused by the user's input or environment."""


class SpecError(GiaBenchError, ValueError):
    """A spec string (``name:key=value,...``) or its values are invalid."""


class PluginError(SpecError):
    """Trusted plug-in code failed: its module does not import, or it called ``sys.exit``."""


class RecordError(GiaBenchError):
    """A gradient record or truth file is missing, corrupt or inconsistent."""


class DataError(GiaBenchError):
    """A data set cannot be loaded (missing files, bad root, bad options)."""


class ConfigError(GiaBenchError):
    """A configuration file (study TOML, metrics file) is invalid."""


class CompressorError(GiaBenchError):
    """A compressor broke its contract (wrong shapes, NaN, byte counts)."""


class CheckpointError(GiaBenchError):
    """A checkpoint (``capture --checkpoint``, ``train --resume``) cannot be read or does not fit the run."""
