"""Run a fork test in a fresh interpreter when this one may not fork.

``launch(fork=True)`` spawns instead of forking once Ray, gRPC or Flower are loaded
(their threads do not survive a fork), and a test whose point is the forked path (hangs
injected by patching this process before the fork, finalizers in forked workers) would
then test the spawn path instead. Such a test calls :func:`ran_in_fresh_process` first:
where this process may fork it returns False and the test runs here; otherwise the same
test runs in a new ``python -m pytest`` process, must pass there, and the call returns True.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gia_bench.train.launch import _fork_unsafe

FRESH_ENV = "GIA_BENCH_TEST_FRESH"


def ran_in_fresh_process(request: pytest.FixtureRequest, timeout: float = 270) -> bool:
    if not _fork_unsafe():
        return False
    if os.environ.get(FRESH_ENV):  # already the fresh process, and still not fork-safe: say so plainly
        pytest.fail("a fresh interpreter loaded Ray/gRPC/Flower before the test: the forked path cannot run")
    env = dict(os.environ, **{FRESH_ENV: "1"})
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", request.node.nodeid],
        cwd=request.config.rootpath, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
    return True
