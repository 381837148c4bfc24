"""The built-in demo study says what issue 12 promises: a training-run section with a
BatchNorm model attacked at >= 2 steps, and an attack budget at which `none` leaks."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from gia_bench import study as study_mod
from gia_bench.study import TrainJob, load_study, train_records


def test_demo_trains_a_batchnorm_model_and_attacks_it_along_the_run():
    from gia_bench.data import load_dataset
    from gia_bench.models import ModelSpec, build_model

    config = load_study(study_mod.DEMO_STUDY)
    plan = config.train
    assert plan is not None and plan.base.nproc_per_node >= 2 and plan.base.lr is None  # the trainer's lr rule
    spec = load_dataset(plan.base.dataset).spec
    net = build_model(ModelSpec(plan.base.model, spec.shape, spec.num_classes))
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert plan.attacks and plan.attack_defenses
    families = {d.split(":")[0] for d in plan.attack_defenses}
    assert {"none", "topk", "lqsgd"} <= families
    for defense in plan.attack_defenses:
        steps = train_records(TrainJob(defense, plan.run_seeds[0], plan, Path("demo") / "train"))
        assert len(steps) >= 2 and min(steps) == 0  # "end" resolves to a later step
    # every defense the study captures also has an accuracy (each one is trained)
    assert plan.defenses is None


@pytest.mark.slow
def test_demo_attack_budget_makes_none_leak_on_digits(tmp_path):
    """The demo's strongest attack on its own `none` digits records: mean PSNR >= 30 dB (~25 s)."""
    from gia_bench.capture import capture
    from gia_bench.evaluate import evaluate

    torch.set_num_threads(1)
    config = load_study(study_mod.DEMO_STUDY)
    assert "digits" in config.datasets and "none" in config.defenses
    dlg = next(a for a in config.attacks if a.split(":")[0] == "dlg")
    records = capture("digits", config.models[0], "none", config.batch_sizes[0], config.images, config.seeds[0],
                      tmp_path / "records")  # fmt: skip
    psnrs = []
    for record in records:
        result = evaluate(record, dlg, "naive", tmp_path / "runs", config.seeds[0])
        psnrs += [image["psnr"] for image in result.data["metrics"]["images"]]
    assert len(psnrs) == config.images
    assert statistics.fmean(psnrs) >= 30.0, psnrs
