"""What a result is the result of: its identity (DESIGN.md, "Results are keyed by content").

A result belongs to (sha256 of the record file, the attack's canonical spec with every
default, the view, the seed, the result schema): not to its folder, not to the record's
id. Every place that asks "is this the same result?" asks this module, so they cannot
disagree:

- ``gia-bench attack`` reuses a ``result.json`` only when its identity is the wanted one
  and the record file it names, where that file exists, hashes to the sha256 it claims
  (:func:`gia_bench.evaluate.evaluate`);
- a study's attack unit is finished only when its ``result.json`` is current for the
  record file now in the study folder (:func:`gia_bench.evaluate.result_is_current`);
- ``gia-bench report`` counts each identity once and refuses two different results that
  claim one (:mod:`gia_bench.reports.dedupe`).

The record's sha256 is of the whole file's bytes, exactly what
:meth:`gia_bench.records.GradientRecord.load` computes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gia_bench.errors import GiaBenchError
from gia_bench.results import RESULT_SCHEMA  # the result.json version, part of every result's identity

#: Fields that differ between two runs of one identity without changing what was measured
#: (wall time, where it ran, the path the record was read from); the rest is the content.
VOLATILE_FIELDS = frozenset({"seconds", "device", "record"})


class ResultConflictError(GiaBenchError):
    """Two results claim one identity (or one folder) but are not the same result."""


@dataclasses.dataclass(frozen=True)
class ResultIdentity:
    """(record sha256, canonical attack spec, view, seed, result schema).

    ``record_sha256`` is None only for results written before records were hashed: such a
    result is never reused, and the report keys it by the record path and id it names too
    (:func:`gia_bench.reports.dedupe.report_key`).
    """

    record_sha256: str | None
    attack: str
    view: str
    seed: int | None
    schema: int

    def describe(self) -> str:
        """One line for messages: the short sha, attack, view, seed and schema."""
        sha = (self.record_sha256 or "none")[:12]
        return f"record sha256 {sha}, attack {self.attack}, view {self.view}, seed {self.seed}, schema {self.schema}"


def canonical_attack(spec: str) -> str:
    """The attack's canonical spec (every parameter spelled out), or ``spec`` as written.

    A spec this installation cannot build (an unknown name, a plug-in the user did not
    trust) stays as written: it is then compared as text, never imported.
    """
    from gia_bench.registry import trusted_plugins

    return _canonical_attack(spec, trusted_plugins())  # what resolves depends on what is trusted now


@functools.lru_cache(maxsize=1024)
def _canonical_attack(spec: str, trusted: tuple[str, ...]) -> str:
    from gia_bench.attacks import create

    try:
        return create(spec).spec
    except (GiaBenchError, TypeError, ValueError):
        return spec


def result_identity(record_sha256: str | None, attack_spec: str, view: str, seed: int | None,
                    schema: int = RESULT_SCHEMA) -> ResultIdentity:
    """The identity of a result: the one function every reader and writer of results uses.

    ``attack_spec`` is canonicalised here, so ``dlg`` and ``dlg:<every default>`` are
    one identity.
    """
    return ResultIdentity(record_sha256, canonical_attack(attack_spec), view, seed, schema)


def identity_of(data: Mapping[str, Any]) -> ResultIdentity | None:
    """The identity a ``result.json`` (its parsed object) claims; None when a field is missing or mistyped."""
    sha, attack, view, seed, schema = (data.get(k) for k in ("record_sha256", "attack", "view", "seed", "schema"))
    if sha is not None and not isinstance(sha, str):
        return None
    if not isinstance(attack, str) or not isinstance(view, str):
        return None
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        return None
    if isinstance(schema, bool) or not isinstance(schema, int):
        return None
    return result_identity(sha, attack, view, seed, schema)


def content_digest(data: Mapping[str, Any]) -> str:
    """sha256 of what a result measured: every field but :data:`VOLATILE_FIELDS`, keys sorted."""
    kept = {k: v for k, v in data.items() if k not in VOLATILE_FIELDS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, allow_nan=True).encode()).hexdigest()


# -- record files ----------------------------------------------------------------------------------

_SHA_CACHE: dict[tuple[str, int, int, int, int], str] = {}
_SHA_CACHE_SIZE = 4096


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks.

    Cached per (path, inode, size, mtime, ctime), so a study's several attack units on one
    record hash it once, and a record replaced or rewritten in place is hashed again.
    Raises OSError when the file cannot be read or is not a regular file (a FIFO would
    block, a device never end).
    """
    path = Path(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path}: not a regular file")
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    sha = _SHA_CACHE.get(key)
    if sha is None:
        with open(path, "rb") as fh:
            sha = hashlib.file_digest(fh, "sha256").hexdigest()
        if len(_SHA_CACHE) >= _SHA_CACHE_SIZE:
            _SHA_CACHE.clear()
        _SHA_CACHE[key] = sha
    return sha


def named_record(data: Mapping[str, Any]) -> Path | None:
    """The record file a result names (its ``record`` field), or None when it names none."""
    named = data.get("record")
    return Path(named) if isinstance(named, str) and named else None


def named_record_sha256(data: Mapping[str, Any]) -> str | None:
    """The actual sha256 of the record file a result names; None when that file is not available.

    A relative name is read from the current folder, as it was written. A name that
    cannot be a record (not a regular file, larger than any record may be) is not
    available either: a hostile result cannot make the reader hash a device or a huge file.
    """
    from gia_bench.records import MAX_FILE_BYTES

    path = named_record(data)
    if path is None:
        return None
    try:
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            return None
        return file_sha256(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        return None


def same_file(a: Path, b: Path) -> bool:
    """Do two paths name one file (after resolving links and relative parts)?"""
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the name
        return False
