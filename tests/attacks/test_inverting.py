import torch

from gia_bench.attacks import create
from gia_bench.attacks.matching import CandidateGradients, attack_model
from gia_bench.metrics import psnr, ssim
from gia_bench.receiver import decode_record

from conftest import make_record


def test_ig_beats_a_random_image_on_convnet():
    record, truth = make_record("convnet:width=16", "photos", (5,), mode="eval")
    rec = create("ig:iterations=200").run(record, "naive", torch.Generator().manual_seed(0))
    spec = record.meta.dataset
    got = spec.denormalize(rec.inputs).clamp(0, 1)[0]
    want = spec.denormalize(truth.inputs).clamp(0, 1)[0]
    noise = torch.rand(want.shape, generator=torch.Generator().manual_seed(0))
    assert ssim(got, want) >= 0.2
    assert ssim(got, want) - ssim(noise, want) >= 0.15
    assert psnr(got, want) > psnr(noise, want) + 3.0
    assert rec.labels.tolist() == truth.labels.tolist()


def test_batched_restart_gradients_equal_one_by_one():
    # the vmap route (restarts stacked) must give each restart's own gradient, BatchNorm in train mode included
    record, truth = make_record("convnet:width=8", "photos", (5, 40), mode="train")
    model = attack_model(record, "cpu")
    grads_of = CandidateGradients(model, record.meta.param_names, route="vmap")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 2, *record.meta.dataset.shape), generator=g, requires_grad=True)
    y = torch.tensor([[1, 2], [3, 4], [5, 6]])
    together = grads_of(x, y)
    looped = CandidateGradients(model, record.meta.param_names, route="loop")(x, y)
    for r in range(3):
        alone = grads_of(x[r : r + 1], y[r : r + 1])
        for a, b, c in zip(together, alone, looped):
            torch.testing.assert_close(a[r], b[0], rtol=1e-3, atol=1e-5)
            torch.testing.assert_close(c[r], b[0], rtol=1e-3, atol=1e-5)
    # second order (what the attack differentiates): both routes agree in eval mode
    ev, _ = make_record("convnet:width=8", "photos", (5, 40), mode="eval")
    ev_model = attack_model(ev, "cpu")
    dx = [
        torch.autograd.grad(sum(t.pow(2).sum() for t in CandidateGradients(ev_model, ev.meta.param_names, route)(x, y)), x)[0]
        for route in ("vmap", "loop")
    ]
    torch.testing.assert_close(dx[0], dx[1], rtol=1e-4, atol=1e-9)
    # vmap's double backward through train-mode BatchNorm is inexact (~1e-4 relative against finite
    # differences in float64), so the attack never picks it there
    assert CandidateGradients(model, record.meta.param_names).route == "loop"
    # at the true batch they are the recorded gradient
    at_truth = grads_of(truth.inputs.unsqueeze(0).expand(2, -1, -1, -1, -1), truth.labels.expand(2, -1))
    for a, b in zip(at_truth, decode_record(record)):
        torch.testing.assert_close(a[1], b, rtol=1e-3, atol=1e-5)


def test_restarts_keep_the_lowest_loss_and_differ_from_one_run():
    record, _ = make_record("convnet:width=8", "photos", (5,), mode="eval")
    rec = create("ig:iterations=10,restarts=3").run(record, "naive", torch.Generator().manual_seed(0))
    losses = rec.extra["restart_losses"]
    assert len(losses) == 3 and rec.final_loss == min(losses)
    assert rec.extra["best_restart"] == losses.index(min(losses))
    # same seed, same result
    again = create("ig:iterations=10,restarts=3").run(record, "naive", torch.Generator().manual_seed(0))
    assert torch.equal(rec.inputs, again.inputs)


def test_boxed_keeps_pixels_in_range():
    record, _ = make_record("convnet:width=8", "photos", (5,), mode="eval")
    rec = create("ig:iterations=5,lr=1").run(record, "naive", torch.Generator().manual_seed(0))
    pixels = record.meta.dataset.denormalize(rec.inputs)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
