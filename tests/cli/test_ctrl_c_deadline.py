"""A command whose cleanup hangs after Ctrl-C still leaves: exit 130 once the deadline passes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from pathlib import Path

REPO = Path(__file__).parents[2]
SCRIPT = """
import sys, time
import gia_bench.cli.base as base
base.CTRL_C_DEADLINE_S = 1.0

@base.app.command("stuck")
def stuck() -> None:
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        time.sleep(60)  # a cleanup that never ends

@base.app.command("other")
def other() -> None:
    pass

base.app(["stuck"])
"""


@pytest.mark.usefixtures("sigint_as_in_a_terminal")
def test_a_cleanup_stuck_after_ctrl_c_is_cut_at_the_deadline():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "the cleanup took over 1 s" in err and "Traceback" not in err
    assert took < 20, took  # 1 s deadline; the cleanup alone would take 60 s


def test_a_command_called_in_process_leaves_no_deadline_behind():
    import gia_bench.cli.base as base

    previous = signal.getsignal(signal.SIGINT)
    try:
        base.app(["--help"], standalone_mode=False)
    except SystemExit:
        pass
    assert signal.getsignal(signal.SIGINT) is previous and not base._deadline_armed.is_set()
