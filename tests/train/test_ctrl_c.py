"""Ctrl-C on ``gia-bench train``: one line saying what was kept, exit 130, no worker tracebacks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gia_bench.train.checkpoint import load_checkpoint


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("sigint_as_in_a_terminal")
def test_ctrl_c_stops_training_with_one_line_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gia_bench", "train", "--dataset", "digits:size=8,channels=1", "--model",
           "mlp:hidden=32", "--epochs", "1000", "--nproc-per-node", "2", "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    # a new process group, as a terminal gives a job: SIGINT goes to the launcher and every worker
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=tmp_path)
    lines = []
    try:
        for line in proc.stdout:  # wait until two epochs ran (a checkpoint exists)
            lines.append(line)
            if " epoch 2/1000" in line:
                break
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    last = [ln for ln in rest.splitlines() if ln.strip()][-1]
    assert last.startswith("interrupted: last checkpoint") and "run again with --resume" in last, text
    assert load_checkpoint(Path(out) / "checkpoint.pt")["epoch"] >= 2
