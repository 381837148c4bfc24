"""Files: the one atomic writer (a temp file beside the target, fsync, then rename) and the one slug.

A reader (or a resumed run) sees the old file or the new one, never half of one, and
an interrupted write leaves no partial file behind: nothing already written is lost.
:func:`slug` makes the file-system-safe names of records, results and figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "slug"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file in ``path``'s folder, fsync it, rename it onto ``path``.

    For writers that want a file name (``torch.save``, ``safetensors.save_file``, PIL).
    The file gets the permissions an ordinary ``open(path, "w")`` would give it
    (``0o666`` less the umask), not the temp file's private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, data: Any, indent: int | None = 2) -> None:
    """Write ``data`` as JSON (with a final newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def slug(
    text: str,
    keep: str = "A-Za-z0-9._+-",
    fill: str = "-",
    strip: str = "",
    default: str = "",
    limit: int | None = None,
    runs: bool = True,
) -> str:
    """``text`` made safe as a file name: characters outside ``keep`` (a regex class body) become ``fill``.

    ``runs``: a run of such characters becomes one ``fill`` (else one per character).
    ``strip``: characters removed from both ends afterwards; ``default``: the name when
    nothing is left. ``limit``: longer names are cut and end with 12 hex digits of the
    SHA-256 of ``text``, so two long names stay distinct (a path component has at most
    255 bytes). Each caller keeps its own rules (they name files that already exist).
    """
    name = re.sub(f"[^{keep}]{'+' if runs else ''}", fill, text)
    name = (name.strip(strip) if strip else name) or default
    if limit is not None and len(name) > limit:
        name = name[: limit - 13] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return name
