"""Report files are written with :mod:`gia_bench.io`'s atomic writer, readable like a plain ``open()``'s file."""

from __future__ import annotations

import os
from pathlib import Path

from gia_bench.io import atomic_write


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never half."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
        # the temp file is private (0600); a report is for sharing: the permissions open() would give
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)

    atomic_write(path, write)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, text.encode("utf-8"))
