"""The ``gia-bench`` command line: parse flags, call the library, render with rich.

Each command is thin: it turns its flags into the library's own objects and calls one
library function, passing it an :class:`~gia_bench.events.Events` view from
:mod:`.render`. This package is the only place that imports rich. :mod:`.base` holds the
app and what commands share; :mod:`.info` lists and reports, :mod:`.run` captures,
attacks and trains, :mod:`.study` runs studies, the demo and audits; :mod:`.tables` and
:mod:`.render` draw.
"""

from gia_bench.cli import info, run, study  # noqa: F401  (each registers its commands on app)
from gia_bench.cli.base import app

__all__ = ["app"]
