"""Trees of tensors between processes without pickle: JSON for the structure, safetensors for the tensors.

The audit runs a plug-in in a worker process and judges what it returns in the parent
(:mod:`gia_bench.audit_worker`, :mod:`gia_bench.remote`). Unpickling what a process that
ran untrusted code wrote would let that code run in the parent, so every frame is a JSON
header (dicts, lists, tuples, numbers, strings, dtypes) plus one safetensors blob holding
its tensors: nothing in either can name code to run.

A frame on a stream is ``MAGIC``, the header's length, the header, the blob's length and
the blob (lengths as 8-byte big-endian integers, each checked against ``MAX_FRAME``).
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

MAGIC = b"GIAW"
#: the largest header or blob a frame may announce (a corrupt length must not allocate gigabytes)
MAX_FRAME = 1 << 31


class WireError(Exception):
    """A frame is malformed, or the other side went away or did not answer in time."""


class Foreign:
    """Stands for an object the other side held that is not data (``name``: its type's name)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name} object>"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WireError(f"unknown dtype {name!r}")
    return dtype


def encode(obj: Any, strict: bool = True) -> tuple[bytes, bytes]:
    """``obj`` (dicts, lists, tuples, str, int, float, bool, None, tensors, dtypes) as (header, blob) bytes.

    With ``strict=False`` any other object becomes a :class:`Foreign` with its type's name
    (a plug-in's step may return anything; the parent must be able to say what it was).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            t = x.detach()
            entry: dict[str, Any] = {"__t__": str(len(tensors)), "device": str(t.device)}
            if t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous():
                # a transposed matrix stays non-contiguous on the other side (the battery's awkward tensors)
                entry["transposed"] = True
                t = t.t()
            tensors[entry["__t__"]] = t.to("cpu").contiguous().clone()
            return entry
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.dtype):
            return {"__dtype__": _dtype_name(x)}
        if isinstance(x, torch.Size):
            return {"__tuple__": [int(v) for v in x]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            return {"__dict__": [[walk(k), walk(v)] for k, v in x.items()]}
        if strict:
            raise WireError(f"cannot send a {type(x).__module__}.{type(x).__qualname__}")
        return {"__foreign__": type(x).__qualname__}

    header = json.dumps(walk(obj)).encode()
    blob = save_tensors(tensors) if tensors else b""
    return header, blob


def decode(header: bytes, blob: bytes) -> Any:
    """The tree :func:`encode` wrote (tensors on the device they were on, where this process has it)."""
    tensors = load_tensors(blob) if blob else {}

    def key(x: Any) -> Any:
        return tuple(x) if isinstance(x, list) else x  # a tuple key came back as a list

    def walk(x: Any) -> Any:
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__t__" in x:
            if x["__t__"] not in tensors:
                raise WireError(f"frame names tensor {x['__t__']!r} that its blob lacks")
            t = tensors[x["__t__"]]
            if x.get("transposed"):
                t = t.t()
            device = str(x.get("device", "cpu"))
            return t if device == "cpu" else t.to(device)
        if "__dtype__" in x:
            return _dtype(x["__dtype__"])
        if "__tuple__" in x:
            return tuple(walk(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {key(walk(k)): walk(v) for k, v in x["__dict__"]}
        if "__foreign__" in x:
            return Foreign(str(x["__foreign__"]))
        raise WireError(f"unknown frame entry {sorted(x)}")

    try:
        return walk(json.loads(header))
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError(f"malformed frame: {exc}") from None


def write_frame(fd: int, obj: Any, strict: bool = True) -> None:
    header, blob = encode(obj, strict)
    data = MAGIC + struct.pack(">Q", len(header)) + header + struct.pack(">Q", len(blob)) + blob
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks = []
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, timeout: float | None = None) -> Any:
    """The next frame on ``fd``; ``TimeoutError`` after ``timeout`` seconds, ``EOFError`` if the writer is gone."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if _read_exact(fd, len(MAGIC), deadline) != MAGIC:
        raise WireError("not a frame (bad magic)")
    (n,) = struct.unpack(">Q", _read_exact(fd, 8, deadline))
    if n > MAX_FRAME:
        raise WireError(f"frame header of {n} bytes announced")
    header = _read_exact(fd, n, deadline)
    (m,) = struct.unpack(">Q", _read_exact(fd, 8, deadline))
    if m > MAX_FRAME:
        raise WireError(f"frame blob of {m} bytes announced")
    return decode(header, _read_exact(fd, m, deadline))
