"""README's "Your own compressor" (issue 29): its example, as printed, passes ``gia-bench audit``.

The code block is cut from README.md and written to a temporary ``mycomp.py``; the audit
runs as the README says, a ``gia-bench`` process with ``PYTHONPATH=.`` in that folder, so
the test reads the plug-in through the same public door a user does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from gia_bench.contract import CHECK_NAMES

REPO = Path(__file__).parents[1]
SECTION = "### Your own compressor"


def _section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count(SECTION) == 1
    body = text.split(SECTION, 1)[1]
    return re.split(r"^#{2,6} ", body, maxsplit=1, flags=re.M)[0]  # up to the next heading ("# " is a code comment)


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", section, flags=re.M | re.S)


def test_readme_compressor_example_passes_the_audit(tmp_path):
    section = _section()
    (code,) = _blocks(section, "python")
    assert code.startswith("# mycomp.py\n")
    (commands,) = _blocks(section, "bash")
    assert "PYTHONPATH=. gia-bench audit mycomp:ScaledSign --quick" in commands
    (tmp_path / "mycomp.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([".", str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "gia_bench", "audit", "mycomp:ScaledSign", "--quick", "--workers", "1", "--out", "audit"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["passed"] is True and audit["spec"] == "mycomp:ScaledSign"
    checks = {c["name"]: c for c in audit["checks"]}
    assert set(CHECK_NAMES) <= set(checks)  # every contract check ran (or does not apply), none failed
    assert all(c["passed"] for c in checks.values()), [c for c in checks.values() if not c["passed"]]
    ran = {n for n in CHECK_NAMES if not checks[n]["skipped"]}
    # everything but error feedback (it keeps none) and CUDA (none here, or checked where present)
    assert set(CHECK_NAMES) - ran <= {"error feedback loses nothing", "CUDA gradients stay on the device"}
    assert {"simulate matches message_values", "two gloo workers agree", "decode needs only the messages"} <= ran
    mine = [s for s in audit["standings"] if s["audited"]]
    assert len(mine) == 1 and mine[0]["bytes"] == 2011  # the README's byte count (LeNet, 1 bit + 4 B/tensor)
