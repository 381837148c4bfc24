"""GradientRecord / Truth: round trip, decode, and strict loading (each corruption has its own error)."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gia_bench.capture import capture_batch, compute_gradient
from gia_bench.data import DatasetSpec
from gia_bench.defenses import create
from gia_bench.errors import RecordError
from gia_bench.models import ModelSpec, build_model
from gia_bench.records import Truth, truth_path
from gia_bench.receiver import decode_record, load_record


def _capture(defense="none"):
    ds = DatasetSpec("toy", (3, 32, 32), 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ms = ModelSpec("lenet", ds.shape, ds.num_classes)
    model = build_model(ms, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = torch.tensor([3, 7])
    return model, x, y, capture_batch(model, ms, ds, x, y, create(defense), "toy-0")


def test_record_round_trip(tmp_path):
    model, x, y, (record, truth) = _capture()
    path = record.save(tmp_path / "toy-0.safetensors")
    truth.save(truth_path(path))
    back = load_record(path)
    assert back.meta == record.meta
    for group in ("messages", "weights", "public"):
        a, b = getattr(record, group), getattr(back, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    t = Truth.load(truth_path(path))
    assert torch.equal(t.inputs, x) and torch.equal(t.labels, y)


def test_none_record_decodes_to_true_gradient(tmp_path):
    model, x, y, (record, _) = _capture()
    back = load_record(record.save(tmp_path / "r.safetensors"))
    true = compute_gradient(model, x, y)
    for a, b in zip(decode_record(back), true):
        assert torch.equal(a, b)


def test_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    torch.save({"x": Evil()}, path)
    with pytest.raises(RecordError, match="evil.safetensors"):
        load_record(path)
    assert not marker.exists()


# -- strict loading: every corruption gives its own error, naming the file -----------------------

def _saved(tmp_path, name="rec.safetensors", defense="none"):
    _, x, y, (record, truth) = _capture(defense)
    path = record.save(tmp_path / name)
    truth.save(truth_path(path))
    return path, x, y


def _rewrite(path, edit_tensors=None, edit_meta=None):
    """Re-save ``path`` with its tensors and/or metadata edited (a plausible, well-formed file)."""
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = dict(fh.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        meta = json.loads(metadata["gia_bench"])
        edit_meta(meta)
        metadata["gia_bench"] = json.dumps(meta)
    save_file(tensors, str(path), metadata=metadata)


def _refused(path, *fragments):
    with pytest.raises(RecordError) as exc:
        load_record(path)
    msg = str(exc.value)
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_wrong_schema_version_is_refused(tmp_path):
    path, *_ = _saved(tmp_path)
    _rewrite(path, edit_meta=lambda m: m.update(schema=99))
    _refused(path, "schema version 99 is not supported")


def test_missing_message_tensor_is_refused(tmp_path):
    path, *_ = _saved(tmp_path)
    _rewrite(path, edit_tensors=lambda t: t.pop("msg/grads"))
    _refused(path, "message tensors ['grads'] are missing")


def test_weight_shape_mismatch_with_model_spec_is_refused(tmp_path):
    path, *_ = _saved(tmp_path)
    _rewrite(path, edit_tensors=lambda t: t.update({"weight/fc.weight": torch.zeros(10, 700)}))
    _refused(path, "weight 'fc.weight' has shape (10, 700)", "needs (10, 768)")


def test_weights_of_another_model_are_refused(tmp_path):
    path, *_ = _saved(tmp_path)
    _rewrite(path, edit_meta=lambda m: m["model"].update(spec="mlp"))
    _refused(path, "of model 'mlp' is missing")


def test_nan_in_a_message_is_refused(tmp_path):
    path, *_ = _saved(tmp_path)

    def poison(t):
        t["msg/grads"] = t["msg/grads"].clone()
        t["msg/grads"][5] = float("nan")

    _rewrite(path, edit_tensors=poison)
    _refused(path, "tensor 'grads' has non-finite values")


def test_truncated_file_is_refused(tmp_path):
    path, *_ = _saved(tmp_path)
    data = path.read_bytes()
    for cut in (1, 1000, len(data) - 100, len(data) - 4):
        path.write_bytes(data[:-cut])
        _refused(path, "truncated")


def test_garbage_bytes_are_refused(tmp_path):
    path = tmp_path / "junk.safetensors"
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path.write_bytes(noise.numpy().tobytes())
    _refused(path, "not a safetensors file")
    path.write_bytes(b"")
    _refused(path, "truncated file (0 bytes)")
    # a well-formed safetensors file that is not ours
    save_file({"x": torch.zeros(3)}, str(path))
    _refused(path, "not a gia-bench record")


class _Evil:
    """Unpickling this creates a marker file: proof that something was executed."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain-pickle"])
def test_pickles_disguised_as_records_are_refused_without_running(tmp_path, fmt):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    path = tmp_path / f"evil-{fmt}.safetensors"
    if fmt == "zip":
        torch.save({"msg/grads": torch.zeros(3), "x": evil}, path)
    elif fmt == "legacy":
        torch.save({"x": evil}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps({"x": evil}))
    assert not marker.exists()
    _refused(path, "not a safetensors file")
    assert not marker.exists()
    # also refused as a truth file
    with pytest.raises(RecordError, match=path.name):
        Truth.load(path)
    assert not marker.exists()


def test_truth_file_is_not_a_record(tmp_path):
    path, *_ = _saved(tmp_path)
    t = truth_path(path)
    _refused(t, "is a truth file, not a gradient record")
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(t.read_bytes())
    _refused(disguised, "is a 'truth' file, expected a record")
    # and the other way round
    with pytest.raises(RecordError, match="is a 'record' file, expected a truth"):
        Truth.load(path)


def test_load_never_touches_the_truth(tmp_path, monkeypatch):
    import gia_bench.records as records

    path, x, y = _saved(tmp_path)
    t = truth_path(path)
    opened = []
    real_read_header, real_open = records._read_header, Path.open

    def guard_header(p, *args):
        assert Path(p) != t, "GradientRecord.load opened the truth file"
        return real_read_header(p, *args)

    def guard_open(self, *args, **kwargs):
        opened.append(self)
        assert self != t, "GradientRecord.load opened the truth file"
        return real_open(self, *args, **kwargs)

    def no_truth(*args, **kwargs):
        raise AssertionError("Truth.load called during GradientRecord.load")

    monkeypatch.setattr(records, "_read_header", guard_header)
    monkeypatch.setattr(Path, "open", guard_open)
    monkeypatch.setattr(Truth, "load", classmethod(no_truth))
    record = load_record(path)
    monkeypatch.undo()
    assert path in opened
    # nothing in what load returns equals the truth: no tensor holds the inputs or the labels
    tensors = {**record.messages, **record.weights, **record.public}
    for name, tensor in tensors.items():
        for secret in (x, y):
            assert not (tensor.shape == secret.shape and torch.equal(tensor, secret.to(tensor.dtype))), name
        assert not (tensor.numel() == x.numel() and torch.equal(tensor.flatten(), x.flatten().to(tensor.dtype)))
    meta_text = json.dumps(record.meta.to_json())
    assert "inputs" not in meta_text and "labels" not in meta_text
    # with the truth gone (or replaced by garbage) the record loads the same
    t.write_bytes(b"garbage")
    again = load_record(path)
    assert again.meta == record.meta
    t.unlink()
    assert load_record(path).meta == record.meta


def test_fp16_record_round_trip_and_decode(tmp_path):
    model, x, y, (record, _) = _capture("fp16")
    back = load_record(record.save(tmp_path / "h.safetensors"))
    assert back.meta.bytes_sent == sum(p.numel() for p in model.parameters()) * 2
    assert back.messages["grads"].dtype == torch.float16
    for a, b in zip(decode_record(back), compute_gradient(model, x, y)):
        # fp16 has an 11-bit significand: relative error <= 2^-11 (values far above fp16's subnormals)
        big = b.abs() > 1e-4
        assert torch.all((a[big] - b[big]).abs() <= b[big].abs() * 2**-11)


# -- trust: a record names code; it runs only if registered or trusted (--plugin) ------------------


@pytest.mark.parametrize("field", ["defense", "model"])
def test_record_naming_a_shell_command_runs_nothing(tmp_path, field):
    marker = tmp_path / "X"
    spec = f"subprocess:Popen:args=touch {marker},shell=true"
    path, *_ = _saved(tmp_path)
    _rewrite(path, edit_meta=lambda m: m.update(defense=spec) if field == "defense" else m["model"].update(spec=spec))
    msg = _refused(path, "subprocess:Popen", "not trusted")
    assert "\n" not in msg
    from gia_bench.registry import trusted

    with trusted(["subprocess:Popen"]):  # even trusted, a Popen is not a compressor or a model: never called
        _refused(path, "subprocess:Popen", "subclass")
    assert not marker.exists()


def test_cli_attack_on_a_shell_command_record_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    marker = tmp_path / "X"
    path, *_ = _saved(tmp_path)
    _rewrite(path, edit_meta=lambda m: m.update(defense=f"subprocess:Popen:args=touch {marker},shell=true"))
    script = Path(sys.executable).with_name("gia-bench")
    for extra in ([], ["--plugin", "subprocess:Popen"]):
        proc = subprocess.run(
            [str(script), "attack", str(path), "--attack", "dlg:iterations=1", "--out", str(tmp_path / "r"), *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "subprocess:Popen" in lines[0] and str(path.name) in lines[0], proc.stderr
        assert not marker.exists()


@pytest.mark.parametrize("module", ["records", "record_checks", "specs"])
def test_the_record_format_imports_no_registry(module):
    """Issue 15.9: records.py is a file format; building the model or the compressor from a record
    (gia_bench.receiver) is its users' job, so it imports no model, defense or attack registry,
    not even inside a function; nor do its field rules (record_checks.py) or its specs (specs.py)."""
    import ast
    import importlib

    import gia_bench.records as records

    forbidden = (
        "gia_bench.models", "gia_bench.defenses", "gia_bench.attacks", "gia_bench.receiver", "gia_bench.registry"
    )
    source = Path(importlib.import_module(f"gia_bench.{module}").__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
    assert imported, "the walk found no import at all"
    bad = sorted(n for n in imported if any(n == m or n.startswith(m + ".") for m in forbidden))
    assert not bad, f"{module}.py imports {bad}"
    assert not any(hasattr(records.GradientRecord, name) for name in ("compressor", "decode", "build_model"))


# -- write_pair: the one writer of record + truth --------------------------------------------------


def test_write_pair_writes_the_truth_first_and_an_interrupted_record_leaves_no_record(tmp_path, monkeypatch):
    from gia_bench.records import GradientRecord, write_pair

    _, x, y, (record, truth) = _capture("topk:ratio=0.1")
    order = []
    real_truth, real_record = Truth.save, GradientRecord.save
    monkeypatch.setattr(Truth, "save", lambda self, p: order.append("truth") or real_truth(self, p))
    monkeypatch.setattr(GradientRecord, "save", lambda self, p: order.append("record") or real_record(self, p))
    path = write_pair(tmp_path / "toy-0.safetensors", record, truth)
    assert order == ["truth", "record"]
    back, t = load_record(path), Truth.load(truth_path(path))
    assert back.meta == record.meta and torch.equal(t.inputs, x) and torch.equal(t.labels, y)

    def interrupted(self, p):
        raise KeyboardInterrupt

    monkeypatch.setattr(GradientRecord, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_pair(tmp_path / "again.safetensors", record, truth)
    # the truth is complete, the record absent: nothing lists a record without its truth
    assert Truth.load(truth_path(tmp_path / "again.safetensors")).record_id == "toy-0"
    assert not (tmp_path / "again.safetensors").exists()


def test_write_pair_refuses_a_truth_that_is_not_the_records(tmp_path):
    """A mismatched pair is refused before either file is written: another id, another batch size,
    or a private residual that is not one float per model parameter (the oracle view reads it)."""
    import dataclasses

    from gia_bench.records import write_pair

    _, x, y, (record, truth) = _capture()
    n_params = sum(record.weights[n].numel() for n in record.meta.param_names)
    bad = {
        "another id": (dataclasses.replace(truth, record_id="toy-1"), "truth of record 'toy-1'"),
        "another batch": (dataclasses.replace(truth, inputs=x[:1], labels=y[:1]), "truth holds 1 examples"),
        "short residual": (dataclasses.replace(truth, private={"residual": torch.zeros(n_params - 1)}), "residual"),
        "integer residual": (
            dataclasses.replace(truth, private={"residual": torch.zeros(n_params, dtype=torch.int64)}), "residual"
        ),
    }
    for name, (wrong, message) in bad.items():
        path = tmp_path / f"{name.replace(' ', '-')}.safetensors"
        with pytest.raises(RecordError, match=message):
            write_pair(path, record, wrong)
        assert not path.exists() and not truth_path(path).exists(), name
    ok = dataclasses.replace(truth, private={"residual": torch.ones(n_params)})
    path = write_pair(tmp_path / "ok.safetensors", record, ok)
    assert torch.equal(Truth.load(truth_path(path)).private["residual"], torch.ones(n_params))


def test_write_pair_without_a_truth_writes_the_record_alone(tmp_path):
    """A federated server in a real deployment does not know the client's batch: the record goes alone."""
    from gia_bench.records import write_pair

    _, _, _, (record, _) = _capture()
    path = write_pair(tmp_path / "alone.safetensors", record, None)
    assert load_record(path).meta == record.meta and not truth_path(path).exists()
