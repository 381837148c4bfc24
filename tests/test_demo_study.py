"""The built-in demo study decides (issue 26): every defense row can carry a verdict the report accepts.

Fast tests check the study file against the report's own rules (the sign test's images at its
Bonferroni level, the banner's budget rule, every compressor family, a structure-aware attack,
a model trained and attacked along the run whose first layer carries the pixels). The slow ones run a reduced copy: the
demo's own attacks on `none` records like the demo's, scored by the report's verdict.
"""

from __future__ import annotations

from pathlib import Path

import dataclasses

import pytest
import torch

from gia_bench import study as study_mod
from gia_bench.reports import stats
from gia_bench.reports.headline import BUDGET_FRACTION, published_budget
from gia_bench.reports.threats import is_structure_aware
from gia_bench.study import TrainJob, load_study, train_records

FAMILIES = {"none", "topk", "qsgd", "signsgd", "powersgd", "lqsgd", "rcfed", "mixedprec"}


def _config():
    return load_study(study_mod.DEMO_STUDY)


def _train_attacks(config) -> tuple[str, ...]:
    return tuple(config.train.attacks or config.attacks)


def test_demo_keeps_every_family_and_a_structure_aware_attack_in_each_section():
    config = _config()
    assert FAMILIES <= {d.split(":")[0] for d in config.defenses}
    assert any(is_structure_aware(a) for a in config.attacks)
    assert any(is_structure_aware(a) for a in _train_attacks(config))
    assert "none" in config.train.attack_defenses


def test_demo_has_the_images_the_sign_test_needs_at_its_bonferroni_level():
    """Each setting's strongest attacker is picked from attacks x views (x steps): its images must suffice."""
    config = _config()
    captures = len(config.attacks) * len(config.views)
    assert config.images * min(config.batch_sizes) >= stats.min_images(captures)
    plan = config.train
    along = len(plan.attack_steps) * len(_train_attacks(config)) * len(config.views)
    assert plan.base.batch_size >= stats.min_images(along)  # one batch of the run per attacked step


def test_demo_budgets_pass_the_reports_banner_rule():
    config = _config()
    from gia_bench.attacks import ATTACKS

    for attack in set(config.attacks) | set(_train_attacks(config)):
        built = ATTACKS.create(attack)
        budget = dataclasses.replace(built.budget, published=built.published_budget, published_known=True)
        pub = published_budget(budget)
        if pub is None:  # not iteration-bound against a published figure (feature, analytic)
            continue
        assert budget.iterations * budget.restarts >= BUDGET_FRACTION * pub[0] * pub[1], attack


def test_demo_trains_a_model_whose_messages_carry_its_pixels_and_attacks_it_along_the_run():
    from gia_bench.attacks.analytic import first_linear
    from gia_bench.data import load_dataset
    from gia_bench.models import ModelSpec, build_model

    config = _config()
    plan = config.train
    assert plan is not None and plan.base.nproc_per_node >= 2 and plan.base.lr is None  # the trainer's lr rule
    spec = load_dataset(plan.base.dataset).spec
    net = build_model(ModelSpec(plan.base.model, spec.shape, spec.num_classes))
    # a fully connected first layer over the whole input: the analytic attack applies to the run's records
    c, h, w = spec.shape
    assert first_linear(net, c * h * w)
    assert "analytic" in {a.split(":")[0] for a in _train_attacks(config)}
    families = {d.split(":")[0] for d in plan.attack_defenses}
    assert {"none", "topk", "lqsgd"} <= families
    for defense in plan.attack_defenses:
        steps = train_records(TrainJob(defense, plan.run_seeds[0], plan, Path("demo") / "train"))
        assert len(steps) >= 2 and min(steps) == 0  # "end" resolves to a later step
    assert plan.defenses is None  # every defense the study captures also has an accuracy (each one is trained)


def _verdict(records: list[Path], attacks: tuple[str, ...], views: tuple[str, ...], out: Path, seed: int,
             comparisons: int) -> stats.Verdict:  # fmt: skip
    """The report's verdict for `none`: its strongest attacker (lowest sign-test p) at level 0.05 / comparisons."""
    from gia_bench.evaluate import evaluate
    from gia_bench.metrics import mean_colour_floor
    from gia_bench.reports.load import load_images

    best = None
    for attack in attacks:
        for view in views:
            pairs = []
            for record in records:
                result = evaluate(record, attack, view, out, seed)
                images = result.result.scores.images
                rec, orig, _ = load_images(result.path.parent / "reconstruction.safetensors", len(images))
                floors = mean_colour_floor(orig)
                pairs += [(im.ssim, im.psnr, f[0], f[1]) for im, f in zip(images, floors)]
            v = stats.floor_verdict(pairs, comparisons=comparisons)
            best = v if best is None or v.p < best.p else best
    assert best is not None
    return best


@pytest.mark.slow
def test_demo_none_leaks_on_its_captures(tmp_path):
    """A reduced copy of the capture section: `none` on digits, the demo's attacks and views (~1 min)."""
    from gia_bench.capture import CaptureConfig, capture

    torch.set_num_threads(1)
    config = _config()
    records = capture(CaptureConfig("digits", config.models[0], "none", config.batch_sizes[0], config.images,
                                    config.seeds[0], tmp_path / "records"))  # fmt: skip
    m = len(config.attacks) * len(config.views)
    verdict = _verdict(records, tuple(config.attacks), tuple(config.views), tmp_path / "runs", config.seeds[0], m)
    assert verdict.verdict == stats.LEAKS, verdict


@pytest.mark.slow
def test_demo_none_leaks_on_the_training_runs_batch(tmp_path):
    """A reduced copy of the training section: one batch of the run's size on its model at its initial weights."""
    from gia_bench.capture import CaptureConfig, capture

    torch.set_num_threads(1)
    config = _config()
    plan = config.train
    records = capture(CaptureConfig(plan.base.dataset, plan.base.model, "none", plan.base.batch_size, 1, config.seeds[0],
                                    tmp_path / "records"))
    m = len(plan.attack_steps) * len(_train_attacks(config)) * len(config.views)
    verdict = _verdict(records, _train_attacks(config), tuple(config.views), tmp_path / "runs", config.seeds[0], m)
    assert verdict.verdict == stats.LEAKS, verdict
