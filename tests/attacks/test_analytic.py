import pytest
import torch

from gia_bench.attacks import create
from gia_bench.attacks.base import AttackError

from conftest import make_record


@pytest.mark.parametrize("combine", ["lstsq", "best"])
def test_analytic_recovers_an_mlp_input_exactly(combine):
    record, truth = make_record("mlp:hidden=128", "photos", (21,))
    rec = create(f"analytic:combine={combine}").run(record, "naive", torch.Generator().manual_seed(0))
    assert rec.inputs.shape == truth.inputs.shape
    assert (rec.inputs - truth.inputs).abs().max() <= 1e-4
    assert rec.labels.tolist() == truth.labels.tolist()
    assert rec.iterations == 0 and rec.final_loss < 1e-8


def test_analytic_batch_is_best_effort_but_finds_images_only_one_unit_sees():
    record, truth = make_record("mlp:hidden=256", "photos", (3, 40, 77, 120))
    rec = create("analytic").run(record, "naive", torch.Generator().manual_seed(0))
    # each reconstruction is compared with its closest original; exact ones exist when a ReLU
    # unit is active for one image only
    d = torch.cdist(rec.inputs.flatten(1), truth.inputs.flatten(1)) / truth.inputs.flatten(1).norm(dim=1)
    assert (d.min(dim=1).values < 1e-3).sum() >= 1
    assert sorted(rec.labels.tolist()) == sorted(truth.labels.tolist())


def test_analytic_is_degraded_by_compression():
    record, truth = make_record("mlp:hidden=128", "photos", (21,), defense="fp16")
    rec = create("analytic").run(record, "naive", torch.Generator().manual_seed(0))
    err = (rec.inputs - truth.inputs).abs().max()
    assert 1e-6 < err < 0.1  # fp16 rounding shows, but the image survives


def test_analytic_needs_a_fully_connected_first_layer_and_an_exact_one_when_aware():
    record, _ = make_record("lenet", "photos", (21,))
    with pytest.raises(AttackError, match="fully connected"):
        create("analytic").run(record, "naive", torch.Generator())
    mlp, _ = make_record("mlp:hidden=32", "photos", (21,))
    with pytest.raises(AttackError, match="no 'oracle' view"):
        create("analytic").run(mlp, "oracle", torch.Generator())
    # aware: QSGD sends no tensor exactly, PowerSGD rank 1 cannot carry a rank-2 gradient (B = 2)
    qsgd, _ = make_record("mlp:hidden=32", "photos", (21,), defense="qsgd")
    with pytest.raises(AttackError, match="first layer is not sent exactly.*quantized"):
        create("analytic").run(qsgd, "aware", torch.Generator())
    low, _ = make_record("mlp:hidden=32", "photos", (21, 60), defense="powersgd:rank=1")
    with pytest.raises(AttackError, match="rank up to 2 rows in play"):
        create("analytic").run(low, "aware", torch.Generator())


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


def test_analytic_aware_recovers_a_batch_through_powersgd_at_rank_b():
    # B = 4 with a repeated label; PowerSGD rank 4 sends both layers of the mlp exactly
    record, truth = make_record("mlp", "photos", (5, 6, 40, 41), defense="powersgd:rank=4")
    rec = create("analytic").run(record, "aware", torch.Generator().manual_seed(0))
    spec = record.meta.dataset
    got, want = spec.denormalize(rec.inputs).clamp(0, 1), spec.denormalize(truth.inputs).clamp(0, 1)
    # rows follow the inferred labels; pair each original with its closest reconstruction
    pair = torch.cdist(want.flatten(1), got.flatten(1)).argmin(dim=1)
    assert sorted(pair.tolist()) == [0, 1, 2, 3]
    assert min(_psnr(got[j], want[i]) for i, j in enumerate(pair.tolist())) >= 40
    assert rec.extra["rows_used"] == 256 and rec.extra["layers"] == ["net.1", "net.3"]
    assert "rank 4 factors" in rec.extra["exact"]["weight"]
    # the naive view's per-row candidates do not get every image of this batch
    naive = create("analytic").run(record, "naive", torch.Generator().manual_seed(0))
    assert naive.view == "naive" and rec.view == "aware" and rec.observed == "messages"


def test_analytic_aware_uses_only_the_entries_topk_keeps():
    record, truth = make_record("mlp:hidden=128", "photos", (21,), defense="topk:ratio=0.1")
    aware = create("analytic").run(record, "aware", torch.Generator().manual_seed(0))
    naive = create("analytic").run(record, "naive", torch.Generator().manual_seed(0))
    known = aware.extra["pixels_known"]
    assert 0 < known < truth.inputs.numel() and 0 < aware.extra["rows_used"] <= 13  # ceil(0.1 * 128) biases
    spec = record.meta.dataset
    want = spec.denormalize(truth.inputs).clamp(0, 1).flatten()
    got = spec.denormalize(aware.inputs).clamp(0, 1).flatten()
    # the pixels the kept entries cover are exact; the naive ratio mixes in the zeros of dropped entries
    covered = (aware.inputs.flatten() != 0)
    assert (got[covered] - want[covered]).abs().max() < 1e-4
    assert _psnr(got, want) > _psnr(spec.denormalize(naive.inputs).clamp(0, 1).flatten(), want)


def test_result_json_says_which_rows_and_layers_analytic_used(tmp_path):
    import json

    from gia_bench.capture import CaptureConfig, capture
    from gia_bench.evaluate import run_attack

    # B = 1 through Top-k 10 %: the kept first-layer rows, by index
    path = capture(CaptureConfig("photos", "mlp:hidden=64", "topk:ratio=0.1", 1, 1, 3, tmp_path / "topk"))[0]
    extra = json.loads(run_attack(path, "analytic", "aware", tmp_path / "runs").read_text())["extra"]
    assert extra["layer"] == "net.1" and "Top-k keeps" in extra["exact"]["bias"]
    assert 0 < extra["rows_used"] <= 7 and len(extra["row_indices"]) == extra["rows_used"]  # ceil(0.1 * 64) biases
    assert all(0 <= i < 64 for i in extra["row_indices"]) and extra["rows"] == 64
    # B = 4 through PowerSGD rank 4: every layer of the ReLU stack, whole
    path = capture(CaptureConfig("photos", "mlp:hidden=64", "powersgd:rank=4", 4, 1, 3, tmp_path / "psgd"))[0]
    result = json.loads(run_attack(path, "analytic", "aware", tmp_path / "runs").read_text())
    assert result["extra"]["layers"] == ["net.1", "net.3"] and result["extra"]["rows_used"] == 64
    assert "rank 4 factors" in result["extra"]["exact"]["weight"] and result["threat"]["observed"] == "messages"
    assert min(im["psnr"] for im in result["scores"]["images"]) >= 40


def test_aware_batch_with_a_label_inferred_twice_takes_the_first_layers_pure_rows(tmp_path):
    """B = 4 with a repeated label: the classifier solve cannot part those two images; the first layer's
    rows that one image activates give each exactly (photos seed 102: labels [0, 7, 0, 6])."""
    import json

    from gia_bench.capture import CaptureConfig, capture
    from gia_bench.evaluate import run_attack

    torch.set_num_threads(1)
    path = capture(CaptureConfig("photos", "mlp", "powersgd:rank=4", 4, 1, 102, tmp_path / "rec"))[0]
    result = json.loads(run_attack(path, "analytic", "aware", tmp_path / "runs").read_text())
    assert result["labels_true"].count(0) == 2  # the case this test is about
    assert "one image activates" in result["extra"]["method"]
    assert min(im["psnr"] for im in result["scores"]["images"]) >= 40
