"""The report's first table (one row per defense setting), its verdicts, budgets, the banner, and training steps."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from report_fixture import (
    DEMO_ATTACKS,
    DEMO_DEFENSES,
    TEST_EXAMPLES,
    TRAIN_DEFENSES,
    TRAIN_IMAGES,
    TRAIN_STEPS,
    TRAIN_VIEWS,
    originals,
    write_demo_like,
    write_result,
    write_train_fixture,
    write_train_metrics,
)
from test_report import html_rows, md_rows

from gia_bench.attacks import create as create_attack
from gia_bench.reports import (
    ReportOptions,
    build_report,
    headline,
    load_runs,
    make_report,
    stats,
    study_warnings,
)
from gia_bench.reports.headline import BUDGET_FRACTION, published_budget
from gia_bench.reports.load import MalformedFile, parse_result
from gia_bench.reports.tables import short_spec
from gia_bench.reports.terminal import HEADERS, terminal_tables
from gia_bench.reports.writers import html_report, markdown


@pytest.fixture(scope="module")
def trainrun(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainrun")
    written = write_train_fixture(root)
    out = root / "out"
    output = make_report(ReportOptions(runs=(root / "runs-train",), out=out, train=(root / "trainruns",), compute_lpips=False))
    return root, written, out, output


def _data(*runs: Path, train: tuple[Path, ...] = ()):
    return build_report(load_runs(runs, train), None)


# -- one row per defense setting --------------------------------------------------------------------


def test_headline_has_one_row_per_defense_and_its_strongest_attacker(trainrun) -> None:
    root, written, out, output = trainrun
    heads = headline(output.data)
    assert len(heads) == 1 and [r.defense for r in heads[0].rows] == list(TRAIN_DEFENSES)  # most bytes first
    for row in heads[0].rows:
        mine = [r for r in output.data.summary if r.defense == row.defense]
        attackers = [r for r in mine if r.view != "oracle"]
        best = max(attackers, key=lambda r: (r.ssim.mean, r.psnr.mean))
        assert row.strongest == best and row.attackers == len(TRAIN_STEPS) * (len(TRAIN_VIEWS) - 1)
        # the oracle reconstructs better in this fixture, yet it is an upper bound, never the attacker
        assert row.oracle is not None and row.oracle.view == "oracle" and row.oracle.ssim.mean > best.ssim.mean
        assert row.strongest.view != "oracle"
        # the verdict rests on the strongest attacker's own images, at the Bonferroni level
        assert row.verdict.n == row.images == TRAIN_IMAGES and row.verdict.comparisons == row.attackers
        assert row.verdict.level == pytest.approx(0.05 / row.attackers)
        # bytes and ratio
        assert row.bytes_per_step == TRAIN_DEFENSES[row.defense][0]
        assert row.compression_ratio == pytest.approx(40_000 / TRAIN_DEFENSES[row.defense][0])


def test_accuracy_standard_error_and_not_different(trainrun) -> None:
    _, _, _, output = trainrun
    rows = {r.defense: r for r in headline(output.data)[0].rows}
    for defense, row in rows.items():
        acc = TRAIN_DEFENSES[defense][3][-1]
        assert row.accuracy.mean == pytest.approx(acc) and row.accuracy.method == "binomial"
        assert row.accuracy.se == pytest.approx(math.sqrt(acc * (1 - acc) / TEST_EXAMPLES))
    assert rows["none"].vs_reference == "reference"
    assert rows["lqsgd:rank=1,bits=8"].vs_reference == "not different"  # 90% vs 91% on 359 images
    assert rows["signsgd"].vs_reference == "lower"  # 76% vs 91%


def test_accuracy_over_seeds_and_without_test_size(tmp_path: Path) -> None:
    root = tmp_path
    gen = torch.Generator().manual_seed(0)
    orig, labels = originals(gen, 2), torch.tensor([1, 2])
    for d in ("none", "topk:ratio=0.1"):
        write_result(root / "runs" / d, gen, orig, labels, 0.05, record_id=d, record="", dataset="digits",
                     model="lenet", defense=d, attack="dlg", view="naive", nbytes=100, bytes_fp32=100)  # fmt: skip
    for seed, acc in enumerate((0.80, 0.84, 0.82)):
        write_train_metrics(root / "train" / f"none-{seed}", dataset="digits", model="lenet", defense="none",
                            accuracies=[acc], steps_per_epoch=10, bytes_per_step=100, test_examples=359, seed=seed)  # fmt: skip
    write_train_metrics(root / "train" / "topk", dataset="digits", model="lenet", defense="topk:ratio=0.1",
                        accuracies=[0.70], steps_per_epoch=10, bytes_per_step=100, test_examples=None)  # fmt: skip
    rows = {r.defense: r for r in headline(_data(root / "runs", train=(root / "train",)))[0].rows}
    none = rows["none"].accuracy
    assert none.method == "seeds" and none.runs == 3 and none.mean == pytest.approx(0.82)
    assert none.se == pytest.approx(0.02 / math.sqrt(3))
    topk = rows["topk:ratio=0.1"]
    assert topk.accuracy.se is None and topk.vs_reference == "unknown"


# -- budgets ------------------------------------------------------------------------------------------


def test_budget_is_read_or_taken_from_the_spec(tmp_path: Path, trainrun) -> None:
    _, written, _, _ = trainrun
    new = parse_result(written["results"][0])
    assert new.budget.iterations == 4800 and new.budget.restarts == 1 and new.budget.preset == "paper"
    assert not new.budget.from_spec and new.step == 0 and new.source == "train"
    gen = torch.Generator().manual_seed(0)
    old = parse_result(write_result(  # a schema-1 file without budget: read from the attack spec
        tmp_path / "old", gen, originals(gen, 2), torch.tensor([3, 7]), 0.1, record_id="r", record="", dataset="photos",
        model="lenet", defense="none", attack="dlg:iterations=300", view="naive", nbytes=100, bytes_fp32=100,
        extra={"schema": 1},
    ))  # fmt: skip
    assert old.budget.from_spec and old.budget.iterations == 300 and old.budget.restarts == 1
    assert old.step == 0 and old.source == "capture"
    assert old.budget.published is None and not old.budget.published_known  # not recorded before schema 3
    data = json.loads(written["results"][0].read_text())
    for bad, message in (
        ({"iterations": "many", "restarts": 1}, "field 'iterations' is str"),
        ({"iterations": 10, "restarts": 0}, "is not a budget"),
        ([1, 2], "field 'budget' is list"),
    ):
        path = tmp_path / "bad" / "result.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({**data, "budget": bad}))
        with pytest.raises(MalformedFile, match=message):
            parse_result(path)
    for key, value, message in (("step", -1, "negative"), ("source", "moon", "source 'moon'"), ("schema", 7, "schema 7")):
        path.write_text(json.dumps({**data, key: value}))
        with pytest.raises(MalformedFile, match=message):
            parse_result(path)


def test_budget_and_images_beside_every_score(trainrun) -> None:
    _, _, out, _ = trainrun
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for rows in (md_rows(md), html_rows(page)):
        scored = [r for r in rows if len(r) >= 9 and any(re.fullmatch(r"0\.\d{3}", c) for c in r)]
        assert scored
        for r in scored:
            assert any(re.fullmatch(r"[\d,]+ it × \d+( \(\w+\))?, n = \d+", c) for c in r), r


# -- the banner ----------------------------------------------------------------------------------------


def test_banner_on_the_demo_like_study(tmp_path: Path) -> None:
    write_demo_like(tmp_path, train_section=False)
    data = _data(tmp_path / "runs", train=(tmp_path / "train",))
    warnings = study_warnings(data)
    few = [w for w in warnings if w.startswith("Too few images")]
    assert len(few) == 1 and f"{2 * len(DEMO_DEFENSES)} of {2 * len(DEMO_DEFENSES)}" in few[0]
    budget = [w for w in warnings if w.startswith("Attack budget")]
    # IG at 300 iterations is far below its published budget (DLG at 30 is too when the rule's fraction is above 10%)
    flagged = [a for a in DEMO_ATTACKS if _spent(a) < BUDGET_FRACTION * _wanted(a)]
    assert short_spec(DEMO_ATTACKS[1], "attack") in {short_spec(a, "attack") for a in flagged}
    assert len(budget) == len(flagged)
    for a, w in zip(sorted(flagged), sorted(budget, key=lambda w: w.split(": ", 1)[1])):
        assert short_spec(a, "attack") in w and f"{_spent(a) / _wanted(a):.1%} of" in w
    for row in (r for g in headline(data) for r in g.rows):
        assert row.verdict.verdict == stats.TOO_FEW  # 2 images can never say "leaks"
    # the demo's accuracies: signsgd:error_feedback=false "beats" none by 5.6 points, within noise
    rows = {r.defense: r for r in headline(data)[0].rows}
    assert rows["signsgd:error_feedback=false"].vs_reference == "not different"


def _spent(attack: str) -> int:
    return int(re.search(r"iterations=(\d+)", attack).group(1))


def _wanted(attack: str) -> int:
    return create_attack(attack).published_budget.steps


def _study(root: Path, images: int, none_noise: float, iterations: int) -> list[Path]:
    gen = torch.Generator().manual_seed(3)
    orig, labels = originals(gen, images), torch.arange(images) % 10
    spec = f"ig:iterations={iterations}"
    for d, noise in (("none", none_noise), ("topk:ratio=0.01", 0.6)):
        write_result(root / d, gen, orig, labels, noise, record_id=d, record="", dataset="photos", model="lenet",
                     defense=d, attack=spec, view="naive", nbytes=100, bytes_fp32=100)  # fmt: skip
    return [root]


def test_no_banner_when_the_study_supports_its_verdicts(tmp_path: Path) -> None:
    data = _data(*_study(tmp_path, images=8, none_noise=0.02, iterations=4800))
    assert study_warnings(data) == ()
    rows = {r.defense: r for r in headline(data)[0].rows}
    assert rows["none"].verdict.verdict == stats.LEAKS
    assert rows["topk:ratio=0.01"].verdict.verdict == stats.FLOOR


def test_banner_when_the_baseline_does_not_leak(tmp_path: Path) -> None:
    data = _data(*_study(tmp_path, images=8, none_noise=0.6, iterations=4800))
    (warning,) = study_warnings(data)
    assert "'none' is indistinguishable from the floor" in warning and "no ranking" in warning


def test_banner_when_the_budget_is_far_below_the_published_one(tmp_path: Path) -> None:
    data = _data(*_study(tmp_path, images=8, none_noise=0.02, iterations=20))
    (warning,) = study_warnings(data)
    it, restarts, _ = published_budget(load_runs([tmp_path]).results[0].budget)
    assert (it, restarts) == (create_attack("ig").published_budget.iterations, create_attack("ig").published_budget.restarts)
    assert warning.startswith("Attack budget far below") and f"{20 / (it * restarts):.1%} of {it:,} x {restarts}" in warning


def test_banner_in_the_report_and_the_rule_stated(tmp_path: Path) -> None:
    write_demo_like(tmp_path, train_section=False)
    data = _data(tmp_path / "runs", train=(tmp_path / "train",))
    md = markdown(data, [], tmp_path, "demo-like")  # the writers alone: figures are tested elsewhere
    page = html_report(data, [], "demo-like")
    assert md.index("cannot support their verdicts") < md.index("At a glance")
    assert page.index('class="banner"') < page.index("At a glance")
    for rule in (stats.ACCURACY_RULE, stats.FLOOR_RULE):
        assert rule.split(":", 1)[0] in md and rule.split(":", 1)[0] in page
    assert "The banner appears when" in md and "The banner appears when" in page
    # the terminal shows the same headline: one row per defense, per dataset
    tables = terminal_tables(data)
    assert [len(t.rows) for t in tables] == [len(DEMO_DEFENSES), len(DEMO_DEFENSES)]
    assert HEADERS[1] == "bytes/worker/step" and all(len(r) == len(HEADERS) for t in tables for r in t.rows)


# -- leakage along a training run ------------------------------------------------------------------------


def test_step_table_and_figure(trainrun) -> None:
    root, written, out, output = trainrun
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert {(r["step"], r["source"]) for r in summary} == {(str(s), "train") for s in TRAIN_STEPS}
    # each row knows the run its record came from
    runs = {str(p) for p in written["train"]}
    assert {r["train_run"] for r in summary} == runs
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "Leakage along training" in md and "Leakage along training" in page
    for rows in (md_rows(md), html_rows(page)):
        steps = [r for r in rows if len(r) == 10 and r[1].isdigit()]
        assert len(steps) == len(TRAIN_DEFENSES) * len(TRAIN_STEPS) * len(TRAIN_VIEWS)
        by = {(r[0], int(r[1]), r[4]): r for r in steps}
        none = short_spec("none", "defense")
        # accuracy: the run's latest evaluation at or before the step (epochs of 45 steps)
        assert by[(none, 0, "naive")][2] == "–"
        assert by[(none, 50, "naive")][2] == "62.0% ± 2.6"
        assert by[(none, 200, "naive")][2] == "90.0% ± 1.6"
    fig = [f for f in output.figures if f.kind == "steps"]
    assert len(fig) == 1 and fig[0].path.is_file()
    with Image.open(fig[0].path) as img:
        assert img.format == "PNG" and img.size[1] > img.size[0] // 2  # one row of panels per defense
    assert "second axis" in fig[0].caption or "right axis" in fig[0].caption


def test_oracle_is_labelled_an_upper_bound_in_every_table(trainrun) -> None:
    _, _, out, _ = trainrun
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for rows in (md_rows(md), html_rows(page)):
        cells = [c for r in rows for c in r if c.startswith("oracle")]
        assert cells and all(c == "oracle (upper bound)" for c in cells), set(cells)
    assert "upper bound" in page.split("</table>", 1)[0]  # already in the headline table's first lines


def test_accuracy_at_a_step_uses_the_evaluation_of_the_same_weights() -> None:
    """A record at step s is the gradient of the weights after s updates; an epoch's evaluation
    counts the updates before it. The "end" record of a 1-epoch run (step 88 of 89) gets the
    evaluation right after its own update, saying so; step 0 has none."""
    from types import SimpleNamespace as NS

    from gia_bench.reports.writers import accuracy_at

    history = [NS(step=89, test_accuracy=0.95, test_examples=359), NS(step=178, test_accuracy=0.97, test_examples=359)]
    data = NS(runs=NS(trains=[NS(path=Path("run/metrics.json"), history=history)]))

    def cell(step):
        return accuracy_at(data, NS(train_run="run/metrics.json", step=step))

    assert cell(0).text == "–" and "no evaluation" in cell(0).sub
    assert cell(88).text.startswith("95.0%") and cell(88).sub == "after its update: step 89"
    assert cell(89).text.startswith("95.0%") and cell(89).sub == "at step 89"
    assert cell(120).text.startswith("95.0%") and cell(120).sub == "at step 89"
    assert cell(177).text.startswith("97.0%") and cell(177).sub == "after its update: step 178"
