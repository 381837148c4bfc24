"""Frames between the audit and its plug-in worker: data only (JSON + safetensors), never a pickle."""

from __future__ import annotations

import os
import struct

import pytest
import torch

from gia_bench.wire import MAGIC, Foreign, WireError, decode, encode, read_frame, write_frame


def test_trees_of_tensors_round_trip_exactly():
    gen = torch.Generator().manual_seed(0)
    tree = {
        "grads": [torch.randn(3, 4, generator=gen), torch.randn((), generator=gen, dtype=torch.float64)],
        0: {"residual": torch.arange(5, dtype=torch.int32)},
        ("layer", 1): (torch.zeros(0), torch.tensor([True, False]), torch.randint(0, 255, (7,), dtype=torch.uint8)),
        "dtype": torch.float16, "shape": torch.Size([2, 3]), "meta": [None, 1.5, "x", 3, False],
    }
    back = decode(*encode(tree))
    assert set(back) == set(tree)
    for a, b in zip(back["grads"], tree["grads"]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(back[0]["residual"], tree[0]["residual"])
    assert all(torch.equal(a, b) for a, b in zip(back[("layer", 1)], tree[("layer", 1)]))
    assert back["dtype"] is torch.float16 and back["shape"] == (2, 3) and back["meta"] == tree["meta"]


def test_a_transposed_matrix_stays_non_contiguous():
    t = torch.randn(24, 9, generator=torch.Generator().manual_seed(1)).t()
    back = decode(*encode([t]))[0]
    assert not back.is_contiguous() and torch.equal(back, t)


def test_objects_that_are_not_data_are_refused_or_named():
    class Secret:
        pass

    with pytest.raises(WireError, match="cannot send"):
        encode({"x": Secret()})
    back = decode(*encode({"x": Secret()}, strict=False))["x"]
    assert isinstance(back, Foreign) and back.name.endswith("Secret")


def test_frames_on_a_pipe_and_what_is_refused():
    r, w = os.pipe()
    try:
        write_frame(w, {"ok": [torch.ones(2)]})
        assert torch.equal(read_frame(r, timeout=5)["ok"][0], torch.ones(2))
        with pytest.raises(TimeoutError):
            read_frame(r, timeout=0.1)  # nothing written: no answer in time
    finally:
        os.close(r)
        os.close(w)
    # a stream that goes wrong is abandoned (the worker is stopped): one pipe per case
    for data, words in (
        (b"\x80\x04pickle!", "magic"),  # not a frame (a pickle's opcodes): refused, never loaded
        (MAGIC + struct.pack(">Q", 1 << 40), "announced"),  # an absurd length is refused before allocating it
    ):
        r, w = os.pipe()
        os.write(w, data)
        with pytest.raises(WireError, match=words):
            read_frame(r, timeout=5)
        os.close(r)
        os.close(w)
    with pytest.raises(WireError, match="unknown dtype"):
        decode(b'{"__dtype__": "not_a_dtype"}', b"")
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(EOFError):
        read_frame(r, timeout=5)  # the writer is gone
    os.close(r)
