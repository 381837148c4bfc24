"""The ``tokens`` attack: the token bag from the embedding gradient's row support, through compressors."""

import json

import pytest
import torch

from gia_bench.attacks import create as create_attack
from gia_bench.attacks.base import AttackError
from gia_bench.capture import capture_batch
from gia_bench.data import load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.models import ModelSpec, build_model
from gia_bench.records import GradientRecord, Truth, truth_path
from gia_bench.text.attacks_tokens import token_bag
from gia_bench.text.metrics import token_f1


@pytest.fixture(scope="module")
def minilm_pii():
    data = load_dataset("pii", split="train")
    models = {mode: build_model(ModelSpec("minilm", data.spec.shape, 4, mode), seed=0) for mode in ("eval", "train")}
    return data, models


def _capture(data, model, mode, defense, indices, seed=0):
    spec = ModelSpec("minilm", data.spec.shape, 4, mode)
    inputs, labels = data.batch(indices)
    torch.manual_seed(seed)  # dropout masks in train mode
    return capture_batch(model, spec, data.spec, inputs, labels, create_defense(defense), "t")


def _f1(record, truth, view):
    rec = create_attack("tokens").run(record, view, torch.Generator().manual_seed(0))
    return token_f1(rec.inputs, truth.inputs), rec


@pytest.mark.parametrize(
    "defense,mode,indices",
    [("none", "eval", [0, 1, 2, 3]), ("none", "train", [4]), ("topk:ratio=0.01", "train", [5, 6, 7, 8, 9, 10, 11, 12]),
     ("qsgd", "eval", [13, 14]), ("powersgd:rank=1", "train", [15, 16, 17, 18])],
)
def test_minilm_bag_is_exact_through_support_keeping_compressors(minilm_pii, defense, mode, indices):
    data, models = minilm_pii
    record, truth = _capture(data, models[mode], mode, defense, indices)
    got = {view: _f1(record, truth, view) for view in ("naive", "aware")}
    assert got["naive"][0] == got["aware"][0] == 1.0
    # the same rows selected: the same bag laid out the same way, so aware never scores below naive
    assert torch.equal(got["aware"][1].inputs, got["naive"][1].inputs)


def test_signsgd_hides_the_support_from_the_norm_but_not_from_the_spread(minilm_pii):
    data, models = minilm_pii
    record, truth = _capture(data, models["train"], "train", "signsgd", [19, 20, 21, 22])
    naive, _ = _f1(record, truth, "naive")
    aware, rec = _f1(record, truth, "aware")
    assert aware == 1.0 and naive < 0.1  # every row has the same norm: naive returns the first B x T rows
    assert rec.extra["statistic"] == "row max - min"


def test_lqsgd_bag_is_nearly_exact(minilm_pii):
    data, models = minilm_pii
    record, truth = _capture(data, models["eval"], "eval", "lqsgd:rank=1", [23, 24])
    assert _f1(record, truth, "aware")[0] >= 0.97  # rows whose P entry rounds to +0 are lost


def test_lqsgd_signed_zero_codes_are_read_from_the_message(minilm_pii):
    """A used row whose P entry rounds to magnitude 0 keeps its sign bit: the aware bag reads it from
    the message, the decoded gradient (all the naive view has) shows a zero row; a row rounded to +0 is
    lost to both, and no unused row is ever read as used."""
    from gia_bench.receiver import decode_record, record_compressor
    from gia_bench.text.attacks_tokens import embedding_name, signed_zero_rows
    from gia_bench.text.data import split_rows

    data, models = minilm_pii
    record, truth = _capture(data, models["eval"], "eval", "lqsgd:rank=1", [29, 30, 31, 32])
    index = list(record.meta.param_names).index(embedding_name(record))
    compressor = record_compressor(record)
    shapes = [torch.Size(s) for s in record.param_shapes]
    group = next(g for g in compressor.plan(shapes).groups if index in g.indices)
    assert compressor.bits == 8 and group.r == 1  # one byte per code, one code per row
    start = group.p_offset + group.indices.index(index) * group.n
    codes = record.messages["P.codes"]
    ids, mask, _ = split_rows(truth.inputs)
    used = sorted(set(ids[mask.bool()].tolist()))
    def bags():
        out = {}
        for view in ("aware", "naive"):
            rec = create_attack("tokens").run(record, view, torch.Generator())
            ids, mask, _ = split_rows(rec.inputs)
            out[view] = set(ids[mask.bool()].tolist())
        return out, rec

    natural = signed_zero_rows(record, index).tolist()  # this batch has one: a used token the decode drops
    before, _ = bags()
    assert natural and set(natural) <= set(used) and before["aware"] - before["naive"] == set(natural)
    minus, plus = sorted(before["naive"])[2:4]
    codes[start + minus] = 128  # sign bit, magnitude 0: what a small negative entry rounds to
    codes[start + plus] = 0  # a small positive entry: the same code as an unused row
    assert float(decode_record(record)[index][minus].abs().sum()) == 0.0
    assert signed_zero_rows(record, index).tolist() == sorted([*natural, minus])
    after, _ = bags()
    assert after["aware"] == before["aware"] - {plus} and after["naive"] == before["naive"] - {plus, minus}
    aware = create_attack("tokens").run(record, "aware", torch.Generator())
    assert aware.extra["signed_zero_rows"] == len(natural) + 1


def test_noise_leaves_no_support():
    gradient = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    bag, _ = token_bag(gradient, "aware", 1e-6)
    assert bag.numel() == 100  # every row carries noise: the bag is everything (precision = |true| / V)
    sparse = torch.zeros(100, 8)
    sparse[[3, 50, 7]] = torch.tensor([3.0, 2.0, 1.0])[:, None] * torch.randn(3, 8, generator=torch.Generator())
    bag, stat = token_bag(sparse, "naive", 1e-6)
    assert bag.tolist() == [3, 50, 7] and (stat[:-1] >= stat[1:]).all()


def test_capture_and_attack_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from gia_bench.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["capture", "--dataset", "pii", "--model", "transformer:d=32,layers=1",
                              "--defense", "topk:ratio=0.01", "--batch-size", "2", "--num", "1",
                              "--out", str(tmp_path / "rec")])
    assert out.exit_code == 0, out.output
    path = next((tmp_path / "rec").glob("*[0-9].safetensors"))
    truth = Truth.load(truth_path(path))
    assert truth.inputs.shape == (2, 1, 3, 32)  # token ids, attention mask, PII fields
    assert GradientRecord.load(path).meta.model.spec.startswith("transformer:d=32,layers=1")
    out = runner.invoke(app, ["attack", str(tmp_path / "rec"), "--attack", "tokens", "--view", "aware",
                              "--out", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    result = json.loads(next((tmp_path / "runs").rglob("result.json")).read_text())
    images = result["scores"]["images"]  # per sentence, every text metric by its result key
    assert [im["token_f1"] for im in images] == [1.0, 1.0] and all("rouge1" in im for im in images)
    text = next((tmp_path / "runs").rglob("reconstruction.txt")).read_text()
    assert "#0 original:" in text and "[" in text


def test_tokens_refuses_an_image_record(tmp_path):
    from gia_bench.capture import CaptureConfig, capture

    path = capture(CaptureConfig("digits", "lenet", "none", 1, 1, 0, tmp_path))[0]
    with pytest.raises(AttackError, match="text record"):
        create_attack("tokens").run(GradientRecord.load(path), "naive", torch.Generator())


def test_text_data_with_an_image_model_is_one_line(tmp_path, capsys):
    from gia_bench.cli import app

    with pytest.raises(SystemExit) as exc:
        app(["capture", "--dataset", "pii", "--model", "lenet", "--num", "1", "--out", str(tmp_path)], prog_name="gia-bench")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "reads images, the data is text" in err and "Traceback" not in err
