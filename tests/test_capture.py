"""capture: seeded batches -> records on disk (+ truth apart), resumable, byte-identical; the CLI."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gia_bench.capture import (
    CaptureConfig,
    batch_indices,
    capture,
    compute_gradient,
    exact_cuda,
    read_checkpoint,
    record_id,
    summarize,
)
from gia_bench.cli import app
from gia_bench.data import load_dataset
from gia_bench.errors import CheckpointError, DataError, RecordError, SpecError
from gia_bench.models import ModelSpec, build_model
from gia_bench.records import Truth, find_records, truth_path
from gia_bench.receiver import decode_record, load_record, record_model

SMALL = dict(dataset="digits", model="lenet", batch_size=2, num=3, seed=0)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_capture_writes_records_with_the_truth_apart(tmp_path):
    paths = capture(CaptureConfig(defense="none", out=tmp_path, **SMALL))
    assert [p.name for p in paths] == [f"digits-lenet-{i:04d}.safetensors" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in paths] + [truth_path(p).name for p in paths]
    )
    assert find_records(tmp_path) == paths  # truth files are not records
    data = load_dataset("digits")
    for path, indices in zip(paths, batch_indices(len(data), 2, 3, seed=0)):
        record, truth = load_record(path), Truth.load(truth_path(path))
        meta = record.meta
        assert meta.record_id == path.name.removesuffix(".safetensors") == truth.record_id
        assert meta.defense == "none" and meta.batch_size == 2 and meta.seed == 0 and meta.step == 0
        assert meta.model == ModelSpec("lenet:init_range=0.5", (3, 32, 32), 10, "train")
        assert meta.dataset == data.spec
        # the truth is exactly the seeded batch of the train split, as model inputs
        inputs, labels = data.batch(indices)
        assert torch.equal(truth.inputs, inputs) and torch.equal(truth.labels, labels)
        # the record's weights are the seeded model's, and a `none` record decodes to the true gradient
        model = build_model(meta.model, seed=0)
        assert all(torch.equal(v, record.weights[k]) for k, v in model.state_dict().items())
        for got, want in zip(decode_record(record), compute_gradient(model, truth.inputs, truth.labels)):
            assert torch.equal(got, want)
        assert meta.bytes_sent == 4 * sum(p.numel() for p in model.parameters())


def test_same_seed_gives_byte_identical_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    capture(CaptureConfig(defense="fp16", out=a, **SMALL))
    capture(CaptureConfig(defense="fp16", out=b, **SMALL))
    capture(CaptureConfig(defense="fp16", out=c, **{**SMALL, "seed": 1}))
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert len(ha) == 6 and ha == hb
    assert set(ha.values()).isdisjoint(hc.values())  # another seed: other batches and weights


def test_capture_resumes_and_refuses_to_mix_captures(tmp_path):
    capture(CaptureConfig(defense="none", out=tmp_path, **{**SMALL, "num": 2}))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    hashes = _hashes(tmp_path)
    capture(CaptureConfig(defense="none", out=tmp_path, **{**SMALL, "num": 3}))
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    assert all(after[name] == before[name] for name in before)  # finished records are not rewritten
    assert len(after) == 6
    # a broken record (e.g. a disk filled up) is captured again, identically
    broken = tmp_path / "digits-lenet-0001.safetensors"
    broken.write_bytes(broken.read_bytes()[:-100])
    capture(CaptureConfig(defense="none", out=tmp_path, **{**SMALL, "num": 3}))
    assert _hashes(tmp_path)["digits-lenet-0001.safetensors"] == hashes["digits-lenet-0001.safetensors"]
    # a valid record of a different capture is never overwritten nor mixed in
    with pytest.raises(RecordError, match="digits-lenet-0000.safetensors: exists from a different capture"):
        capture(CaptureConfig(defense="fp16", out=tmp_path, **SMALL))
    with pytest.raises(RecordError, match="different capture"):
        capture(CaptureConfig(defense="none", out=tmp_path, **{**SMALL, "seed": 5}))
    assert no_temp_files(tmp_path)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_every_record_starts_from_the_same_model(tmp_path):
    # BatchNorm in train mode updates running statistics on every forward: a capture must not drift
    paths = capture(CaptureConfig("faces", "convnet:width=4", "none", batch_size=2, num=2, seed=3, out=tmp_path))
    r0, r1 = (load_record(p) for p in paths)
    assert r0.meta.model.spec == "convnet:width=4" and r0.meta.model.mode == "train"
    assert all(torch.equal(r0.weights[k], r1.weights[k]) for k in r0.weights)
    fresh = build_model(r0.meta.model, seed=3).state_dict()
    assert all(torch.equal(fresh[k], r0.weights[k]) for k in fresh)
    assert not torch.equal(r0.messages["grads"], r1.messages["grads"])


def test_eval_mode_gradient_matches_the_recorded_model(tmp_path):
    (path,) = capture(CaptureConfig("photos", "convnet:width=4", "none", batch_size=3, num=1, seed=0, out=tmp_path,
                      model_mode="eval"))
    record, truth = load_record(path), Truth.load(truth_path(path))
    assert record.meta.model.mode == "eval"
    model = record_model(record)
    assert not model.training
    for got, want in zip(decode_record(record), compute_gradient(model, truth.inputs, truth.labels)):
        assert torch.equal(got, want)


def test_fp16_sends_half_the_bytes_and_the_summary_says_so(tmp_path):
    rows32 = summarize(capture(CaptureConfig(defense="none", out=tmp_path / "n", **SMALL)))
    rows16 = summarize(capture(CaptureConfig(defense="fp16", out=tmp_path / "h", **SMALL)))
    assert [r.ratio for r in rows32] == [1.0] * 3 and [r.ratio for r in rows16] == [2.0] * 3
    assert rows16[0].bytes_sent * 2 == rows32[0].bytes_sent == rows32[0].fp32_bytes == 4 * 15_826


def test_batch_indices_are_seeded_distinct_and_cover_the_data():
    batches = batch_indices(10, 3, 7, seed=4)
    assert batches == batch_indices(10, 3, 7, seed=4) and batches != batch_indices(10, 3, 7, seed=5)
    assert all(len(set(b)) == 3 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:9]) == sorted(set(flat[:9]))  # no repeats before every image is used once
    assert set(flat[:10]) == set(range(10))
    with pytest.raises(DataError, match="--batch-size 11 is larger than the 10 training images"):
        batch_indices(10, 11, 1, seed=0)


def test_record_ids_are_stable_and_filesystem_safe():
    assert record_id("digits:channels=1", "convnet:width=8", 7) == "digits-convnet-0007"
    assert record_id("mypkg.data:MyData:x=1", "lenet", 0) == "mypkg.data_MyData-lenet-0000"


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(SpecError, match="unknown dataset"):
        capture(CaptureConfig("nope", "lenet", "none", 1, 1, 0, tmp_path))
    with pytest.raises(SpecError, match="unknown model"):
        capture(CaptureConfig("digits", "vgg", "none", 1, 1, 0, tmp_path))
    with pytest.raises(SpecError, match="unknown defense"):
        capture(CaptureConfig("digits", "lenet", "zip", 1, 1, 0, tmp_path))
    with pytest.raises(SpecError, match="--model-mode"):
        capture(CaptureConfig("digits", "lenet", "none", 1, 1, 0, tmp_path, model_mode="test"))
    with pytest.raises(SpecError, match="--num must be >= 1"):
        capture(CaptureConfig("digits", "lenet", "none", 1, 0, 0, tmp_path))
    assert not any(tmp_path.iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpecError, match="--out .*file: is a file"):
        capture(CaptureConfig("digits", "lenet", "none", 1, 1, 0, tmp_path / "file"))


def test_exact_cuda_turns_off_tf32_and_autotuning_then_restores_them():
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), (
        torch.backends.cudnn, "deterministic"), (torch.backends.cudnn, "benchmark")
    before = [getattr(m, a) for m, a in flags]
    torch.backends.cudnn.benchmark = True
    with exact_cuda():
        assert [getattr(m, a) for m, a in flags] == [False, False, True, False]
    assert torch.backends.cudnn.benchmark is True
    torch.backends.cudnn.benchmark = before[3]
    assert [getattr(m, a) for m, a in flags] == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_capture_is_fp32_exact_and_reproducible(tmp_path):
    # measured on an H100: TF32 convolutions put ResNet-18 gradients 8-10% (relative L2) off fp32
    kw = dict(dataset="photos", model="resnet18", defense="none", batch_size=4, num=2, seed=0, model_mode="eval")
    gpu = capture(CaptureConfig(out=tmp_path / "g1", device="cuda", **kw))
    again = capture(CaptureConfig(out=tmp_path / "g2", device="cuda", **kw))
    cpu = capture(CaptureConfig(out=tmp_path / "c", device="cpu", **kw))
    for a, b, c in zip(gpu, again, cpu):
        assert a.read_bytes() == b.read_bytes()
        ga, gc = load_record(a).messages["grads"], load_record(c).messages["grads"]
        assert float((ga - gc).norm() / gc.norm()) < 1e-4


# -- checkpoints ---------------------------------------------------------------------------------


def _trained_like(seed: int = 9) -> dict[str, torch.Tensor]:
    """A LeNet state dict different from the seed-0 initialisation (stands in for trained weights)."""
    return build_model(ModelSpec("lenet", (3, 32, 32), 10), seed=seed).state_dict()


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "safetensors", "ddp-wrapped", "record"])
def test_checkpoint_formats_load_into_the_record(tmp_path, fmt):
    state = _trained_like()
    ckpt = tmp_path / "ckpt.bin"
    if fmt == "torch-zip":
        torch.save({"model": state, "epoch": 3}, ckpt)
    elif fmt == "torch-legacy":
        torch.save(state, ckpt, _use_new_zipfile_serialization=False)
    elif fmt == "safetensors":
        save_file(state, str(ckpt))
    elif fmt == "ddp-wrapped":
        torch.save({f"module.{k}": v for k, v in state.items()}, ckpt)
    else:  # a record's weights: attack a model at the step another capture recorded
        src = capture(CaptureConfig(defense="none", out=tmp_path / "src", **{**SMALL, "num": 1, "seed": 9}))[0]
        ckpt = src
    (path,) = capture(CaptureConfig(defense="none", out=tmp_path / "out", checkpoint=ckpt, **{**SMALL, "num": 1}))
    record = load_record(path)
    assert all(torch.equal(record.weights[k], v) for k, v in state.items())
    assert record.meta.extra["checkpoint_sha256"] == hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()


def test_bad_checkpoints_give_clear_errors(tmp_path):
    def refused(path: Path, fragment: str) -> None:
        with pytest.raises(CheckpointError) as exc:
            capture(CaptureConfig(defense="none", out=tmp_path / "out", checkpoint=path, **{**SMALL, "num": 1}))
        assert str(path) in str(exc.value) and fragment in str(exc.value), str(exc.value)

    refused(tmp_path / "missing.pt", "no such checkpoint file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000).replace(b"\x80", b"\x00").replace(b"PK", b"QK"))
    refused(junk, "neither a safetensors file nor a torch.save file")
    mlp = tmp_path / "mlp.pt"
    torch.save(build_model(ModelSpec("mlp", (3, 32, 32), 10)).state_dict(), mlp)
    refused(mlp, "does not fit model 'lenet:init_range=0.5'")
    wrong = tmp_path / "wrong.safetensors"
    state = _trained_like()
    state["fc.weight"] = torch.zeros(10, 700)
    save_file(state, str(wrong))
    refused(wrong, "tensor 'fc.weight' has shape (10, 700), model 'lenet:init_range=0.5' needs (10, 768)")
    nan = tmp_path / "nan.pt"
    state = _trained_like()
    state["fc.bias"][0] = float("inf")
    torch.save(state, nan)
    refused(nan, "non-finite")
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    refused(empty, "holds no state dict")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_checkpoint_dtypes_and_special_files_are_refused(tmp_path):
    def refused(path: Path, fragment: str) -> None:
        with pytest.raises(CheckpointError) as exc:
            capture(CaptureConfig(defense="none", out=tmp_path / "out", checkpoint=path, **{**SMALL, "num": 1}))
        assert str(path) in str(exc.value) and fragment in str(exc.value), str(exc.value)

    codes = tmp_path / "codes.safetensors"
    state = _trained_like()
    state["fc.weight"] = state["fc.weight"].to(torch.int32)  # integer codes where fp32 weights belong
    save_file(state, str(codes))
    refused(codes, "tensor 'fc.weight' has dtype torch.int32")
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)  # would block a reader forever
    refused(fifo, "not a regular file")
    half = tmp_path / "half.pt"  # lower-precision weights are weights: accepted
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in _trained_like().items()}, half)
    (path,) = capture(CaptureConfig(defense="none", out=tmp_path / "half-out", checkpoint=half, **{**SMALL, "num": 1}))
    assert load_record(path).weights["fc.weight"].dtype == torch.float32


class _Evil:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    for legacy in (False, True):
        path = tmp_path / f"evil{legacy}.pt"
        torch.save({"fc.weight": evil}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match="weights_only"):
            read_checkpoint(path)
        assert not marker.exists()


# -- other compressors ----------------------------------------------------------------------------


@pytest.mark.parametrize("defense", ["powersgd:rank=1", "topk:ratio=0.01", "lqsgd:rank=1"])
def test_capture_with_compressing_defenses(tmp_path, defense):
    name = defense.split(":")[0]
    a = capture(CaptureConfig(defense=defense, out=tmp_path / "a", **SMALL))
    capture(CaptureConfig(defense=defense, out=tmp_path / "b", **SMALL))
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    for path in a:
        record = load_record(path)
        fp32 = 4 * sum(record.weights[n].numel() for n in record.meta.param_names)
        assert 0 < record.meta.bytes_sent < fp32 / 4  # rank 1 / 1%: far fewer bytes than plain SGD
        assert record.meta.defense.startswith(name + ":")
        assert sum(m["nbytes"] for m in record.meta.messages) == record.meta.bytes_sent
        decoded = decode_record(record)
        assert [tuple(g.shape) for g in decoded] == [tuple(s) for s in record.param_shapes]


# -- the CLI ---------------------------------------------------------------------------------------


def _cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        app(args, prog_name="gia-bench")
    return int(exc.value.code or 0)


def test_cli_capture_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "rec"
    code = _cli(["capture", "--dataset", "digits", "--model", "lenet", "--defense", "fp16", "--batch-size", "1",
                 "--num", "2", "--seed", "0", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "digits-lenet-0000" in text and "digits-lenet-0001" in text
    assert "31,652" in text and "63,304" in text and "2.0x" in text  # fp16: half of 15,826 x 4 bytes
    assert len(find_records(out)) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--model", "vgg"], "unknown model 'vgg'"),
        (["--defense", "topk:ratio=x"], "'x' is not a number"),
        (["--model-mode", "predict"], "--model-mode must be 'train' or 'eval'"),
        (["--dataset", "cifar10"], "--data-root"),
    ],
)
def test_cli_flag_errors_are_one_red_line_exit_2(tmp_path, capsys, args, message):
    code = _cli(["capture", "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
