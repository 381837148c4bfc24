"""Without the ``flower`` extra, ``gia-bench federated`` says what to install: one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_federated_without_flower_is_one_line_exit_2(tmp_path):
    # sys.modules["flwr"] = None makes every `import flwr...` fail as if Flower were not installed
    code = "import sys; sys.modules['flwr'] = None; from gia_bench.cli import app; app()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code, "federated", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "pip install 'gia-bench[flower]'" in lines[0]
    assert not (tmp_path / "run").exists()
