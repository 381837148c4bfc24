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


def test_analytic_needs_a_fully_connected_first_layer_and_the_naive_view():
    record, _ = make_record("lenet", "photos", (21,))
    with pytest.raises(AttackError, match="fully connected"):
        create("analytic").run(record, "naive", torch.Generator())
    mlp, _ = make_record("mlp:hidden=32", "photos", (21,))
    with pytest.raises(AttackError, match="no 'aware' view"):
        create("analytic").run(mlp, "aware", torch.Generator())
