import dataclasses

import pytest
import torch

from gia_bench.attacks import create
from gia_bench.attacks.base import AttackError
from gia_bench.attacks.matching import CandidateGradients, attack_model
from gia_bench.attacks import views as views_module
from gia_bench.attacks.views import build_view
from gia_bench.defenses.none import NoCompression

from conftest import make_record


def test_aware_view_of_none_is_the_naive_view():
    record, truth = make_record("lenet", "photos", (5,))
    naive, aware = build_view(record, "naive"), build_view(record, "aware")
    assert naive.observed == "decoded gradient" and aware.observed == "messages"
    assert not naive.compressor_known and aware.compressor_known
    grads = CandidateGradients(attack_model(record, "cpu"), record.meta.param_names)(
        truth.inputs.unsqueeze(0), truth.labels.unsqueeze(0)
    )
    for view in (naive, aware):
        (target,) = view.targets
        (row,) = view.transform(grads)
        torch.testing.assert_close(row[0], target)  # the truth matches its own observation


def test_aware_and_naive_attacks_agree_on_none():
    record, _ = make_record("lenet", "digits", (7,))
    spec = "dlg:iterations=25,line_search=true,boxed=true"  # the demo's kind of DLG
    a = create(spec).run(record, "naive", torch.Generator().manual_seed(0))
    b = create(spec).run(record, "aware", torch.Generator().manual_seed(0))
    assert a.view == "naive" and b.view == "aware"
    # bit-identical, not merely close: L-BFGS amplifies any rounding difference between two ways of
    # summing the same distance into different reconstructions (seen: 31.1 vs 28.4 dB on a digit)
    assert torch.equal(a.inputs, b.inputs) and a.final_loss == b.final_loss


@pytest.mark.parametrize(
    "defense, extends", [("qsgd:levels=16", True), ("topk:ratio=0.1", False), ("powersgd:rank=1", False)]
)
def test_a_view_that_holds_the_naive_one_whole_skips_the_naive_phase(defense, extends):
    """QSGD's aware view is the decoded gradient through the identity plus the exact bucket norms: no
    naive phase (it would only restart the schedule). A mask or a projection keeps the phase."""
    record, _ = make_record("lenet", "digits", (7,), defense=defense)
    view = build_view(record, "aware")
    assert view.extends_naive is extends and not view.same_as_naive
    rec = create("ig:iterations=4").run(record, "aware", torch.Generator().manual_seed(0))
    assert rec.extra["candidates"] == (["aware:0"] if extends else ["naive:0", "aware:0"])
    assert rec.budget.iterations == 4 and rec.iterations == 4


def test_aware_view_needs_simulate(monkeypatch):
    class Opaque(NoCompression):
        supports_simulate = False

    record, _ = make_record("lenet", "photos", (5,))
    # the view builds the record's compressor through gia_bench.receiver: hand it one without simulate
    monkeypatch.setattr(views_module, "record_compressor", lambda record: Opaque())
    with pytest.raises(AttackError, match=r"--view aware: defense 'none' has no compressor-aware view"):
        create("ig:iterations=1").run(record, "aware", torch.Generator())


def _observes_the_sent_values(view, record) -> str:
    """"" when ``view``'s observation is exactly the values ``record`` sent (same count, same numbers)."""
    sent = record.messages["values"].to(torch.float32).reshape(-1)
    if view.target.numel() != sent.numel():
        return f"observes {view.target.numel()} values, {sent.numel()} were sent"
    if not torch.equal(view.target, sent):
        return "observes other values than the sent ones"
    return ""


def test_topk_aware_view_compares_the_sent_values_only():
    record, truth = make_record("lenet", "photos", (5,), defense="topk:ratio=0.01")
    aware, naive = build_view(record, "aware"), build_view(record, "naive")
    # ratio 0.01: k = max(1, ceil(n / 100)) values per tensor are sent, and the aware view observes exactly them
    numels = [s.numel() for s in record.param_shapes]
    assert record.messages["values"].numel() == sum(max(1, -(-n // 100)) for n in numels)
    assert aware.keys == ("values",) and _observes_the_sent_values(aware, record) == ""
    assert naive.target.numel() == sum(numels)
    # the truth's gradient through the aware map reproduces the observation (a fresh compressor: no residual)
    grads = CandidateGradients(attack_model(record, "cpu"), record.meta.param_names)(
        truth.inputs.unsqueeze(0), truth.labels.unsqueeze(0)
    )
    torch.testing.assert_close(aware.rows(grads)[0], aware.target)
    # positive controls: the same checks catch a view that observes more than was sent (the dense
    # decoded gradient), a record whose sent values differ, and a candidate that is not the truth's
    assert "were sent" in _observes_the_sent_values(naive, record)
    values = record.messages["values"].clone()
    values[0] += 1.0
    tampered = dataclasses.replace(record, messages={**record.messages, "values": values})
    assert "other values" in _observes_the_sent_values(build_view(tampered, "aware"), record)
    other = [g * 1.01 for g in grads]
    assert not torch.allclose(aware.rows(other)[0], aware.target)


def test_unknown_view_is_refused():
    record, _ = make_record("lenet", "photos", (5,))
    with pytest.raises(AttackError, match="--view 'blind'"):
        create("dlg").run(record, "blind", torch.Generator())


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["topk:ratio=0.01", "powersgd:rank=1", "lqsgd:rank=1"])
def test_dlg_against_strong_compression_fails_but_labels_leak(defense):
    # ANCHORS: Top-k 1% and PowerSGD rank 1 drop DLG on the LeNet to ~5 dB PSNR, even aware
    from gia_bench.metrics import psnr

    record, truth = make_record("lenet", "photos", (5,), defense=defense, pixel_space=True)
    for view in ("naive", "aware"):
        rec = create("dlg:iterations=100").run(record, view, torch.Generator().manual_seed(0))
        spec = record.meta.dataset
        got = spec.denormalize(rec.inputs).clamp(0, 1)[0]
        want = spec.denormalize(truth.inputs).clamp(0, 1)[0]
        assert psnr(got, want) < 15.0
        assert rec.labels.tolist() == truth.labels.tolist()
