"""Imported once by the local engine's forkserver, so every worker it forks starts warm.

Importing torch and gia-bench's attacks, metrics and capture costs a fresh interpreter
about 4 CPU seconds and hundreds of MiB; imported here, each worker is a cheap fork that
shares those pages. Nothing here starts threads or touches CUDA (forking stays safe).

The forkserver itself dies with the driver (Linux ``PR_SET_PDEATHSIG``; the driver
starts it from its main thread): otherwise a driver killed while the forkserver still
imports torch would leave it running until the import ends.
"""

import inspect
import signal

from gia_bench.engines.worker import _pdeathsig

if any(frame.filename.endswith("multiprocessing/forkserver.py") for frame in inspect.stack()):
    _pdeathsig(signal.SIGKILL)

import torch  # noqa: E402,F401

import gia_bench.attacks  # noqa: E402,F401
import gia_bench.evaluate  # noqa: E402,F401
import gia_bench.capture  # noqa: E402,F401
import gia_bench.defenses  # noqa: E402,F401
import gia_bench.engines.units  # noqa: E402,F401
import gia_bench.metrics  # noqa: E402,F401
import gia_bench.study.units  # noqa: E402,F401  (the functions every study unit names)
