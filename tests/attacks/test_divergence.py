"""A diverging optimiser must leave the last finite reconstruction, never NaN."""

import math

import torch

from gia_bench.attacks import create
from gia_bench.attacks.optimizers import OPTIMIZERS
from gia_bench.capture import capture_batch
from gia_bench.data import DatasetSpec
from gia_bench.defenses import create as create_defense
from gia_bench.models import ModelSpec, build_model


def test_nan_step_keeps_last_finite_iterate(monkeypatch):
    ds = DatasetSpec("toy", (3, 32, 32), 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ms = ModelSpec("lenet", ds.shape, ds.num_classes)
    model = build_model(ms, seed=0)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    record, _ = capture_batch(model, ms, ds, x, torch.tensor([3]), create_defense("none"), "toy")

    adam = OPTIMIZERS.get("adam")

    poisoned = [0]  # NaN writes over the whole run (every rebuilt optimiser counts afresh)

    class PoisonedAdam(adam):  # after 5 sound steps, every step writes NaN into the dummy
        def build(self, tensors, lr, max_iter, history_size, line_search):
            opt = super().build(tensors, lr, max_iter, history_size, line_search)
            inner = opt.step
            count = [0]

            def step(*args, **kwargs):
                out = inner(*args, **kwargs)
                count[0] += 1
                if count[0] > 5:
                    poisoned[0] += 1
                    with torch.no_grad():
                        tensors[0].fill_(math.nan)
                return out

            opt.step = step
            return opt

    # the same attack, unpoisoned, stopped after the 5 sound steps: the poisoned run takes those
    # steps exactly, so the best finite iterate it keeps is at least as good
    clean = create("ig:iterations=5,decay=false").run(record, "naive", torch.Generator().manual_seed(0))
    monkeypatch.setitem(OPTIMIZERS._classes, "adam", PoisonedAdam)
    rec = create("ig:iterations=20,decay=false").run(record, "naive", torch.Generator().manual_seed(0))
    # the poison did fire (the attack ran this optimiser and diverged), and every NaN step was
    # answered by one back-off to the best finite iterate with a fresh optimiser (5 sound steps each:
    # 20 iterations hold 3 poisoned ones)
    assert poisoned[0] == 3
    assert rec.extra["backoffs"] == poisoned[0]
    assert rec.iterations == 20
    assert torch.isfinite(rec.inputs).all()
    assert math.isfinite(rec.final_loss) and rec.final_loss <= clean.final_loss
