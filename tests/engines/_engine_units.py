"""Toy unit functions for the engine tests (importable by forkserver workers: tests/engines is on sys.path)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from gia_bench.errors import GiaBenchError


def write(ctx, path: str, text: str, read: str | None = None, extra: str | None = None) -> None:
    """Write ``text`` (+ the content of ``read``) to ``path``; ``extra`` is written first (a non-marker file)."""
    if read is not None:
        text = text + (ctx.inputs / read).read_text()
    if extra is not None:
        (ctx.outputs / extra).parent.mkdir(parents=True, exist_ok=True)
        (ctx.outputs / extra).write_text("extra")
    out = ctx.outputs / path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def fail(ctx, path: str) -> None:
    """Write a partial file, then fail."""
    out = ctx.outputs / path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("partial")
    raise GiaBenchError("toy unit failed on purpose")


def whoami(ctx, path: str) -> None:
    """Record the process that ran the unit."""
    out = ctx.outputs / path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{os.getpid()} {os.getppid()}")


def slow(ctx, workdir: str, seconds: float) -> None:
    """An in-place unit: say it started (and its pid), leave a temp file, then take long."""
    folder = ctx.inputs / workdir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".partial.x.tmp").write_text("partial")
    (folder / "started").write_text(str(os.getpid()))
    time.sleep(seconds)
    (folder / "done").write_text("done")


def interrupt_when(ctx, flag: str) -> None:
    """Wait until ``flag`` exists (another unit is in flight), then act as if Ctrl-C was pressed."""
    deadline = time.monotonic() + 120
    while not (ctx.inputs / flag).exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{flag} never appeared")
        time.sleep(0.05)
    raise KeyboardInterrupt


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a reparented zombie may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def descendants(pid: int) -> dict[int, int]:
    """Every process below ``pid`` -> its depth (1: a child)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, int] = {}
    todo = [(pid, 0)]
    while todo:
        p, depth = todo.pop()
        for c in children.get(p, []):
            found[c] = depth + 1
            todo.append((c, depth + 1))
    return found


def rendezvous(ctx, path: str, me: str, other: str, matmul: int = 0) -> None:
    """Finish only once the ``other`` unit runs at the same time (so two slots ran them), then
    multiply two ``matmul`` x ``matmul`` matrices on the unit's torch threads; record who ran it."""
    flags = ctx.inputs / "flags"
    flags.mkdir(exist_ok=True)
    (flags / me).write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not (flags / other).exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{other} never ran beside {me}")
        time.sleep(0.02)
    threads = 0
    if matmul:
        import torch

        threads = torch.get_num_threads()
        x = torch.ones(matmul, matmul)
        assert float((x @ x)[0, 0]) == matmul
        assert float(torch.zeros(1 << 20).exp().sum()) == 1 << 20  # an OpenMP parallel region on >1 thread
    out = ctx.outputs / path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{os.getpid()} {os.getppid()} {threads}")
