"""Ctrl-C on ``gia-bench audit`` while its battery runs: exit 130 within seconds, one line, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("sigint_as_in_a_terminal")
def test_ctrl_c_stops_the_audit_and_its_battery(tmp_path):
    out = tmp_path / "audit"
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "gia_bench", "audit", "powersgd:rank=2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=tmp_path)  # its own group: SIGINT reaches every process
    lines = []
    try:
        for line in proc.stdout:  # the battery (a study in a child process) is running units
            lines.append(line)
            if "capture done" in line:
                break
        os.killpg(proc.pid, signal.SIGINT)
        start = time.monotonic()
        rest, _ = proc.communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert [ln for ln in text.splitlines() if ln.strip()][-1].startswith("interrupted: the audit stopped"), text
    assert took < 30, took  # a hang guard; the probe measured about 2 s
