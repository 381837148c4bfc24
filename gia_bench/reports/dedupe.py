"""Each result counted once: the report keys results by what they are the result of, not by file.

Three things a list of ``result.json`` files cannot tell, settled here before anything
is counted (:func:`dedupe`, called by :func:`gia_bench.reports.load.load_runs`):

1. One file reached twice (``gia-bench report a a``, a folder and a file inside it) is
   read once.
2. A result whose record file says otherwise: the record file it names exists and
   hashes to another sha256 than the result claims (the record was captured again
   since, or the result was copied or forged from another record's). It is left out and
   listed as skipped, naming the file and both hashes: it does not describe the record
   that is there. A record file that is not available (moved, on another machine)
   cannot be checked; such a result counts.
3. Two files claiming one identity (:mod:`gia_bench.identity`): with the same content
   (one record attacked into two folders) they are one result: the first by path counts
   and the others are listed as skipped, naming the file they repeat; with different
   content the report refuses (:class:`~gia_bench.identity.ResultConflictError`, one line
   naming both files), since which of them is the result is not the report's to guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gia_bench.identity import ResultConflictError, named_record_sha256
from gia_bench.results import AttackResult, Skipped


def report_key(result: AttackResult) -> tuple[Any, ...]:
    """The identity a result is counted under (:attr:`~gia_bench.results.AttackResult.identity`).

    Its attack spec is compared as stored: the attack runner stores the canonical spec,
    so counting asks no attack registry (``reports/`` imports none).

    A result written before records were hashed has no sha256: the record path, id and
    defense it names stand in for it.
    """
    ident = result.identity
    key: tuple[Any, ...] = (ident.record_sha256, ident.attack, ident.view, ident.seed, ident.schema)
    if result.record_sha256 is None:
        key += (result.record, result.record_id, result.defense)
    return key


def _describe(result: AttackResult) -> str:
    if result.record_sha256 is not None:
        return result.identity.describe()
    return f"record {result.record or result.record_id!r}, attack {result.attack}, view {result.view}, seed {result.seed}"


def _same_path(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def dedupe(results: Sequence[AttackResult]) -> tuple[list[AttackResult], list[Skipped]]:
    """The results to count, and the ones left out with why; see the module docstring.

    Raises :class:`~gia_bench.identity.ResultConflictError` for two results of one
    identity whose content differs.
    """
    skipped: list[Skipped] = []
    files: dict[Path, AttackResult] = {}
    for r in sorted(results, key=lambda r: str(r.path)):
        files.setdefault(_same_path(r.path), r)  # one file reached twice is one file
    kept: dict[tuple[Any, ...], AttackResult] = {}
    for r in files.values():
        if r.record_sha256 is not None:
            actual = named_record_sha256({"record": r.record})
            if actual is not None and actual != r.record_sha256:
                skipped.append(Skipped(
                    r.path,
                    f"its record {r.record} has sha256 {actual[:12]}, not the {r.record_sha256[:12]} this result"
                    " claims (the record changed since, or the result is another record's): not counted",
                ))
                continue
        key = report_key(r)
        first = kept.get(key)
        if first is None:
            kept[key] = r
        elif first.content == r.content:
            skipped.append(Skipped(r.path, f"the same result as {first.path} ({_describe(r)}): counted once"))
        else:
            raise ResultConflictError(
                f"{first.path} and {r.path}: two results of one identity ({_describe(r)}) with different"
                " content; keep one of them (move the other out of the folders given to the report)"
            )
    return list(kept.values()), skipped
