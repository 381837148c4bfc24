"""The batched restart route (per-restart weight copies, im2col products) against one pass per restart."""

import pytest
import torch
from torch import nn

from gia_bench.attacks import create, matching
from gia_bench.attacks.matching import CandidateGradients, attack_model
from gia_bench.attacks.unfold import BatchedRestartGradients, unsupported

from conftest import make_record

CASES = [  # (model, mode, images): every model family the route knows, BatchNorm in both modes
    ("lenet", "train", (5, 40)),
    ("mlp:hidden=16,depth=2", "train", (5, 40)),
    ("convnet:width=4", "train", (5, 40)),
    ("convnet:width=4", "eval", (5,)),
    ("resnet18", "eval", (5,)),
    pytest.param("resnet18", "train", (5, 40), marks=pytest.mark.slow),  # ~12 s; train BN is covered by convnet
]


@pytest.mark.parametrize("spec,mode,indices", CASES)
def test_per_restart_gradients_equal_the_loop_in_float64(spec, mode, indices):
    record, _ = make_record(spec, "photos", indices, mode=mode)
    model = attack_model(record, "cpu").double()
    g = torch.Generator().manual_seed(0)
    R, B = (2 if spec == "resnet18" else 3), len(indices)  # ResNet-18 in float64 is the slow case
    x = torch.randn((R, B, *record.meta.dataset.shape), generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, record.meta.dataset.num_classes, (R, B), generator=g)
    batched = CandidateGradients(model, record.meta.param_names, route="unfold")
    assert batched.route == "unfold" and batched.fallback is None
    looped = CandidateGradients(model, record.meta.param_names, route="loop")
    ga, gb = batched(x, y), looped(x, y)
    # relative to the whole gradient's scale: a conv bias before train-mode BatchNorm has gradient 0 (~1e-16)
    scale = max(float(t.detach().abs().max()) for t in gb)
    for a, b in zip(ga, gb, strict=True):
        assert a.shape == b.shape == (R, *b.shape[1:])
        assert float((a - b).detach().abs().max()) <= 1e-10 * scale
    # the second order the attack differentiates: a distance of the gradients, back to x
    w = [torch.randn(t.shape[1:], generator=g, dtype=torch.float64) for t in gb]
    da, db = (torch.autograd.grad(sum((t * v).sum() + t.pow(2).sum() for t, v in zip(gs, w)), x)[0] for gs in (ga, gb))
    assert float((da - db).abs().max()) <= 1e-10 * float(db.abs().max())
    # the model is left as it was: its layers' own forward again
    assert all("forward" not in m.__dict__ for m in model.modules())
    # soft labels (joint label optimisation) take the same route
    p = torch.softmax(torch.randn((R, B, record.meta.dataset.num_classes), generator=g, dtype=torch.float64), -1)
    for a, b in zip(batched(x, p), looped(x, p), strict=True):
        assert float((a - b).detach().abs().max()) <= 1e-10 * scale


class _Mixes(nn.Module):
    """A container whose forward mixes samples across the batch: batching restarts would be wrong."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1) - x.flatten(1).mean(0))


def test_an_unknown_module_falls_back_to_the_loop():
    for model, where in ((_Mixes(), "_Mixes"), (nn.Sequential(nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 3)), "1")):
        names = tuple(n for n, _ in model.named_parameters())
        assert unsupported(model).startswith(where)
        grads = CandidateGradients(model, names, route="unfold")
        assert grads.route == "loop" and grads.fallback.startswith(where)
        assert CandidateGradients(model, names, batch_size=1).route == "loop"
        with pytest.raises(ValueError, match="batched restarts"):
            BatchedRestartGradients(model, names)
        x, y = torch.randn(2, 3, 4), torch.tensor([[0, 1, 2], [2, 1, 0]])
        for r in range(2):  # the fallback is the loop: each restart its own pass
            alone = torch.autograd.grad(nn.functional.cross_entropy(model(x[r]), y[r]), list(model.parameters()))
            for a, b in zip(grads(x, y), alone):
                torch.testing.assert_close(a[r], b)


def test_auto_takes_the_route_only_where_it_was_measured_faster():
    def route(spec, batch, mode="eval"):
        record, _ = make_record(spec, "photos", tuple(range(5, 5 + batch)), mode=mode)
        return CandidateGradients(attack_model(record, "cpu"), record.meta.param_names, batch_size=batch).route

    assert route("lenet", 1, "train") == route("resnet18", 1) == "unfold"
    assert route("lenet", 8, "train") == route("convnet:width=4", 1) == route("mlp:hidden=16", 1) == "loop"
    record, _ = make_record("lenet", "photos", (5,))
    assert CandidateGradients(attack_model(record, "cpu"), record.meta.param_names).route == "loop"  # batch unknown


def test_ig_restarts_batched_equal_one_pass_per_restart(monkeypatch):
    record, _ = make_record("lenet", "photos", (5,), mode="train")
    spec = "ig:iterations=12,restarts=3,signed=false"
    runs = {}
    for route in ("loop", "unfold"):
        monkeypatch.setattr(
            matching, "candidate_function", lambda m, r, _route=route: CandidateGradients(m, r.meta.param_names, _route)
        )
        runs[route] = create(spec).run(record, "naive", torch.Generator().manual_seed(0))
    a, b = runs["unfold"], runs["loop"]
    torch.testing.assert_close(a.extra["restart_losses"], b.extra["restart_losses"], rtol=1e-4, atol=1e-6)
    assert a.extra["best_restart"] == b.extra["best_restart"]
    torch.testing.assert_close(a.inputs, b.inputs, rtol=1e-4, atol=1e-4)
    # and the restarts really moved: not three copies of the start
    assert len({round(v, 6) for v in a.extra["restart_losses"]}) == 3
