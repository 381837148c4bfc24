"""Malformed records: each gives one RecordError naming the file, fast, without a traceback or a hang.

The named cases are the ones found by hand (a FIFO, a huge batch size, a huge image, a
wrong dtype, forged byte counts, a defense spec that does not match the messages ...);
the hypothesis test mutates real small records structure-aware (header JSON fields,
tensor dtype / shape / offsets / bytes, truncation) and asserts that loading either
succeeds or raises RecordError, each example within a time bound, memory bounded.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gia_bench.capture import capture_batch
from gia_bench.data import DatasetSpec
from gia_bench.defenses import create
from gia_bench.errors import GiaBenchError, RecordError
from gia_bench.fedavg import LocalTraining
from gia_bench.models import ModelSpec, build_model
from gia_bench.receiver import load_record

_DEFENSES = ("none", "topk:ratio=0.1", "lqsgd:rank=1")


def _small_record(defense: str) -> bytes:
    """A real record of a tiny MLP on 1x8x8 inputs (a few hundred parameters), as file bytes."""
    ds = DatasetSpec("toy", (1, 8, 8), 10, (0.5,), (0.25,))
    ms = ModelSpec("mlp:hidden=8", ds.shape, ds.num_classes)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 1, 8, 8, generator=gen), torch.tensor([1, 4])
    record, _ = capture_batch(build_model(ms, seed=0), ms, ds, x, y, create(defense), "toy-0")
    from safetensors.torch import save

    tensors = {f"msg/{k}": v for k, v in record.messages.items()}
    tensors.update({f"weight/{k}": v for k, v in record.weights.items()})
    tensors.update({f"public/{k}": v for k, v in record.public.items()})
    return save(tensors, metadata={"gia_bench": json.dumps({"kind": "record", **record.meta.to_json()})})


_ORIGINALS = {d: _small_record(d) for d in _DEFENSES}


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _pack(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _meta_of(data: bytes) -> dict:
    return json.loads(_split(data)[0]["__metadata__"]["gia_bench"])


def _with_meta(data: bytes, edit) -> bytes:
    header, body = _split(data)
    meta = json.loads(header["__metadata__"]["gia_bench"])
    edit(meta)
    header["__metadata__"]["gia_bench"] = json.dumps(meta)
    return _pack(header, body)


def _with_tensor(data: bytes, name: str, tensor: torch.Tensor) -> bytes:
    """Replace tensor ``name`` by ``tensor`` (a well-formed file, consistent offsets)."""
    from safetensors.torch import load, save

    header, _ = _split(data)
    tensors = load(data)
    tensors[name] = tensor
    return save(tensors, metadata=header["__metadata__"])


def _load_error(tmp_path: Path, data: bytes, name: str = "r.safetensors") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(RecordError) as info:
        load_record(path)
    assert time.perf_counter() - start < 10
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


def test_the_small_records_are_valid(tmp_path):
    for defense, data in _ORIGINALS.items():
        path = tmp_path / "ok.safetensors"
        path.write_bytes(data)
        assert load_record(path).meta.defense.split(":")[0] == defense.split(":")[0]


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(RecordError, match="FIFO"):
        load_record(fifo)
    assert time.perf_counter() - start < 10
    # the real command: exit 2, one line, no traceback, no hang
    script = Path(sys.executable).with_name("gia-bench")
    proc = subprocess.run([str(script), "attack", str(fifo), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "FIFO" in lines[0], proc.stderr


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m.update(batch_size=10**9), ["batch_size", "4096"]),
        (lambda m: m.update(batch_size=-1), ["batch_size"]),
        (lambda m: m.update(batch_size=0), ["batch_size"]),
        (lambda m: m.update(batch_size="2"), ["batch_size", "integer"]),
        (lambda m: (m["model"].update(in_shape=[3, 20000, 20000]), m["dataset"].update(shape=[3, 20000, 20000])),
         ["in_shape", "20000"]),
        (lambda m: m.update(batch_size=4096) or m["model"].update(in_shape=[64, 512, 512]) or
         m["dataset"].update(shape=[64, 512, 512], mean=[0.0] * 64, std=[1.0] * 64), ["input values"]),
        (lambda m: m["dataset"].update(std=[0.25, 0.25, 0.25]), ["std", "one number per channel"]),
        (lambda m: m["dataset"].update(std=[0.0]), ["std", "> 0"]),
        (lambda m: m.update(record_id="x" * 5000), ["record_id", "5000 characters"]),
        (lambda m: m.update(bytes_sent=-1), ["bytes_sent"]),
        (lambda m: m.update(bytes_sent=1e30), ["bytes_sent", "integer"]),
        (lambda m: m.update(bytes_sent=m["bytes_sent"] + 1), ["bytes_sent", "sum of the messages"]),
        (lambda m: m["messages"][0].pop("tag"), ["messages", "lacks ['tag']"]),
        (lambda m: m["messages"][0].pop("shape"), ["messages", "lacks ['shape']"]),
        (lambda m: m.update(defense="lqsgd:rank=100000"), ["lqsgd:rank=100000", "not what defense"]),
        (lambda m: m.update(surprise=1), ["undeclared", "surprise"]),
        (lambda m: m.update(local_steps=0, local_lr=0.1, local_batch=1), ["local_steps"]),
        (lambda m: m.update(local_steps=2, local_lr=float("inf"), local_batch=1), ["local_lr"]),
        (lambda m: m.update(extra=[[[[]]]] * 3), ["extra", "object"]),
    ],
)
def test_bad_metadata_is_one_line(tmp_path, edit, words):
    msg = _load_error(tmp_path, _with_meta(_ORIGINALS["none"], edit))
    for w in words:
        assert w in msg, msg


def test_fedavg_metadata_is_accepted_and_optional(tmp_path):
    """The three FedAvg fields load as written; without them a record is FedSGD (one step on the
    whole batch); they are metadata only: the messages are a plain gradient's layout either way."""
    local = ("local_steps", "local_lr", "local_batch")
    assert not set(local) & set(_meta_of(_ORIGINALS["none"]))  # a FedSGD record writes none of them
    plain_path, fedavg_path = tmp_path / "p.safetensors", tmp_path / "f.safetensors"
    plain_path.write_bytes(_ORIGINALS["none"])
    fedavg_path.write_bytes(
        _with_meta(_ORIGINALS["none"], lambda m: m.update(local_steps=3, local_lr=0.05, local_batch=1))
    )
    plain, fedavg = load_record(plain_path), load_record(fedavg_path)
    assert plain.meta.is_fedsgd and tuple(getattr(plain.meta, k) for k in local) == (1, None, None)
    assert plain.meta.local_training() == LocalTraining(1, 1.0, plain.meta.batch_size)
    assert not fedavg.meta.is_fedsgd and tuple(getattr(fedavg.meta, k) for k in local) == (3, 0.05, 1)
    assert fedavg.meta.local_training() == LocalTraining(3, 0.05, 1)
    for a, b in ((plain.messages, fedavg.messages), (plain.weights, fedavg.weights)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_deeply_nested_header_json_is_refused(tmp_path):
    header, body = _split(_ORIGINALS["none"])
    header["__metadata__"]["x"] = "y"
    raw = json.dumps(header).encode()
    raw = raw[:-1] + b', "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    msg = _load_error(tmp_path, struct.pack("<Q", len(raw)) + raw + body)
    assert "nests" in msg
    meta_deep = _with_meta(_ORIGINALS["none"], lambda m: m.update(extra={"a": json.loads("[" * 500 + "]" * 500)}))
    assert "nests" in _load_error(tmp_path, meta_deep)


def test_int32_weights_where_fp32_belong_are_refused(tmp_path):
    name = next(k for k in _split(_ORIGINALS["none"])[0] if k.startswith("weight/") and k.endswith("weight"))
    data = _with_tensor(_ORIGINALS["none"], name, torch.zeros(_split(_ORIGINALS["none"])[0][name]["shape"],
                                                                dtype=torch.int32))  # fmt: skip
    assert "torch.int32" in _load_error(tmp_path, data)


@pytest.mark.parametrize("bad", [10**6, -1])
def test_topk_index_out_of_range_is_refused(tmp_path, bad):
    data = _ORIGINALS["topk:ratio=0.1"]
    from safetensors.torch import load

    indices = load(data)["msg/indices"].clone()
    indices[0] = bad
    assert "topk index out of range" in _load_error(tmp_path, _with_tensor(data, "msg/indices", indices))


def test_text_file_says_text(tmp_path):
    msg = _load_error(tmp_path, b"hello\n", "notes.safetensors")
    assert "text file" in msg and "truncated" not in msg


# -- fuzzing: structure-aware mutations of real records ---------------------------------------------

_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 10**9, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.text(min_size=3000, max_size=6000),
    st.lists(st.integers(-5, 40000), max_size=5), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)  # fmt: skip
_META_PATHS = [
    ("record_id",), ("defense",), ("batch_size",), ("bytes_sent",), ("param_names",), ("messages",), ("step",),
    ("seed",), ("loss",), ("extra",), ("schema",), ("kind",), ("model",), ("model", "spec"), ("model", "in_shape"),
    ("model", "num_classes"), ("model", "mode"), ("dataset",), ("dataset", "shape"), ("dataset", "mean"),
    ("dataset", "std"), ("dataset", "num_classes"), ("messages", 0), ("messages", 0, "tag"), ("messages", 0, "shape"),
    ("messages", 0, "dtype"), ("messages", 0, "nbytes"), ("messages", 0, "payload_nbytes"), ("messages", 0, "op"),
    ("local_steps",), ("local_lr",), ("param_names", 0), ("extra", "world_size"), ("extra", "rank"),
    ("extra", "source"),
]  # fmt: skip
_DTYPES = ["F32", "F16", "I32", "I64", "U8", "BOOL", "F64", "BF16", "XX"]


@st.composite
def _mutated(draw) -> bytes:
    data = _ORIGINALS[draw(st.sampled_from(_DEFENSES))]
    kind = draw(st.sampled_from(["meta_set", "meta_delete", "tensor_header", "tensor_bytes", "truncate", "flip"]))
    if kind in ("meta_set", "meta_delete"):
        path = draw(st.sampled_from(_META_PATHS))
        value = draw(_JSON_VALUES)

        def edit(meta):
            node = meta
            for key in path[:-1]:
                if isinstance(node, dict) and key in node or isinstance(node, list) and key < len(node):
                    node = node[key]
                else:
                    return
            last = path[-1]
            if kind == "meta_delete" and isinstance(node, dict):
                node.pop(last, None)
            elif isinstance(node, dict) or isinstance(node, list) and last < len(node):
                node[last] = value

        return _with_meta(data, edit)
    header, body = _split(data)
    names = sorted(k for k in header if k != "__metadata__")
    if kind == "tensor_header":
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if field == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(_DTYPES))
        elif field == "shape":
            header[name]["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=4))
        else:
            header[name]["data_offsets"] = draw(st.lists(st.integers(-10, len(body) + 10), min_size=0, max_size=3))
        return _pack(header, body)
    if kind == "tensor_bytes":
        name = draw(st.sampled_from(names))
        start, end = header[name]["data_offsets"]
        noise = draw(st.binary(min_size=end - start, max_size=end - start)) if end - start <= 4096 else bytes(
            draw(st.integers(0, 255)) for _ in range(16)) * ((end - start) // 16) + b"\0" * ((end - start) % 16)
        return _pack(header, body[:start] + noise + body[end:])
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        raw[draw(st.integers(0, min(len(raw), 8 + 2048) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(data=_mutated())
def test_fuzzed_records_give_record_errors_only(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        load_record(path)
    except RecordError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc), str(exc)
    except GiaBenchError as exc:  # pragma: no cover - only RecordError is expected from load
        pytest.fail(f"{type(exc).__name__} instead of RecordError: {exc}")
    assert time.perf_counter() - start < 5, "loading one small record took more than 5 s"
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 512 * 1024, f"loading one small record raised the peak RSS by {grown_kib} KiB"
