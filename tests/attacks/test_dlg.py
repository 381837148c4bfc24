import pytest
import torch

from gia_bench.attacks import create
from gia_bench.attacks.labels import infer_labels
from gia_bench.attacks.matching import attack_model
from gia_bench.metrics import psnr, ssim

from conftest import make_record, pick


@pytest.mark.slow  # the default run stays under 15 min on 2 cores; run with -m slow
def test_dlg_recovers_a_photo_on_lenet():
    # DLG's own setting: pixels in [0, 1] fed unnormalised to the sigmoid LeNet
    record, truth = make_record("lenet", "photos", (5,), pixel_space=True)
    rec = create("dlg:iterations=90").run(record, "naive", torch.Generator().manual_seed(0))
    spec = record.meta.dataset
    got = spec.denormalize(rec.inputs).clamp(0, 1)[0]
    want = spec.denormalize(truth.inputs).clamp(0, 1)[0]
    assert psnr(got, want) >= 30.0
    assert ssim(got, want) >= 0.98
    assert rec.labels.tolist() == truth.labels.tolist()
    assert rec.label_strategy == "idlg" and rec.iterations == 90


def test_idlg_labels_are_right_on_every_class():
    # one record per class (photos: one class per photo)
    g = torch.Generator().manual_seed(0)
    for label in range(10):
        for model in ("lenet", "mlp:hidden=64"):
            record, truth = make_record(model, "photos", pick("photos", (label,), skip=3))
            name, labels = infer_labels(record, attack_model(record, "cpu"), "auto", g)
            assert name == "idlg"
            assert labels.tolist() == truth.labels.tolist() == [label]


def test_dlg_joint_labels_recover_the_label():
    record, truth = make_record("lenet", "photos", (37,), pixel_space=True)
    rec = create("dlg:iterations=20,labels=joint").run(record, "naive", torch.Generator().manual_seed(1))
    assert rec.label_strategy == "joint"
    assert rec.labels.tolist() == truth.labels.tolist()
