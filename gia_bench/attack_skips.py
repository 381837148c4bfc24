"""An attack that refused a record: ``skipped.json`` where its ``result.json`` would be.

A structure-aware attack (``feature``, ``analytic``) refuses a record whose messages carry
nothing it reads exactly, and says why (:class:`~gia_bench.attacks.base.NotApplicable`).
That is an answer, not a failure: a study counts the unit as done and its report lists the
skip with the reason, instead of a failed unit that stops the study's verdicts.

The file carries the same identity as a result (record content, canonical attack spec,
view, seed, schema), so a study that resumes does not run the attack again on the same
record, and attacks a replaced record afresh. Like every file gia-bench reads back, it is
untrusted: bounded in size, parsed as JSON, checked field by field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gia_bench.identity import file_sha256, identity_of, result_identity
from gia_bench.io import atomic_write_json
from gia_bench.results import RESULT_FILE, Skipped

SKIP_FILE = "skipped.json"
KIND = "attack_skipped"
#: a skip file is a few hundred bytes; anything far larger is not one of ours
MAX_BYTES = 64 * 1024
#: a reason longer than this is cut (reasons are one line from the attack)
MAX_REASON = 2000


def write_skip(out_dir: Path, record_path: Path, record_sha256: str, attack_spec: str, view: str, seed: int,
               reason: str) -> Path:
    """Record that ``attack_spec`` in ``view`` refused the record; any older result in ``out_dir`` is removed."""
    ident = result_identity(record_sha256, attack_spec, view, seed)
    data = {
        "kind": KIND, "schema": ident.schema, "record_sha256": record_sha256, "attack": ident.attack,
        "view": view, "seed": seed, "record": str(record_path), "reason": reason[:MAX_REASON],
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SKIP_FILE
    atomic_write_json(path, data)
    (out_dir / RESULT_FILE).unlink(missing_ok=True)  # the record now at that path is refused, not attacked
    return path


def clear_skip(out_dir: Path) -> None:
    """A result was written: an earlier refusal in the same folder no longer describes it."""
    (out_dir / SKIP_FILE).unlink(missing_ok=True)


def read_skip(path: Path) -> dict[str, Any] | None:
    """The parsed skip file, or None when it is missing, too large, not JSON or not a skip."""
    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") != KIND or not isinstance(data.get("reason"), str):
        return None
    return data


def skip_is_current(skip_path: Path, record_path: Path, attack_spec: str, view: str, seed: int) -> bool:
    """Is ``skip_path`` this attack's refusal of the record file now at ``record_path``?"""
    data = read_skip(Path(skip_path))
    if data is None:
        return False
    try:
        sha = file_sha256(Path(record_path))
    except OSError:
        return False
    return identity_of(data) == result_identity(sha, attack_spec, view, seed)


def settled(result_path: Path, record_path: Path, attack_spec: str, view: str, seed: int) -> bool:
    """Is this attack done with the record now at ``record_path``: a current result, or its current refusal?"""
    from gia_bench.evaluate import result_is_current

    result_path = Path(result_path)
    return result_is_current(result_path, record_path, attack_spec, view, seed) or skip_is_current(
        result_path.with_name(SKIP_FILE), record_path, attack_spec, view, seed)


def skipped_entry(path: Path) -> Skipped | None:
    """How a report lists a skip file: the attack, its view, the record and the attack's reason."""
    data = read_skip(path)
    if data is None:
        return None
    record = data.get("record") if isinstance(data.get("record"), str) else "?"
    attack = data.get("attack") if isinstance(data.get("attack"), str) else "?"
    view = data.get("view") if isinstance(data.get("view"), str) else "?"
    return Skipped(path, f"{attack} ({view}) refused {Path(record).name}: {data['reason'][:MAX_REASON]}")


__all__ = ["SKIP_FILE", "clear_skip", "read_skip", "settled", "skip_is_current", "skipped_entry", "write_skip"]
