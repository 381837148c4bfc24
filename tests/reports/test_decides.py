"""The report a newcomer reads first (issue 26) and the structure-aware attackers in it (issue 25 item 3).

A synthetic study (made-up bytes, real SSIM/PSNR of seeded noise): 8 images per setting
in two records, two attackers per defense, so the sign test at 0.05 / 2 can say "leaks"
(8 of 8 images above the floor: p = 0.004).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from report_fixture import originals, write_fixture, write_result, write_train_metrics

from gia_bench.reports import ReportOptions, build_report, headline, load_runs, make_report, stats
from gia_bench.reports.figures import noisy_frontier
from gia_bench.reports.headline import structure_note, summary_sentence
from gia_bench.reports.names import display_names, full_spec, study_spellings
from gia_bench.reports.tables import build_report as build_report_fn
from gia_bench.reports.threats import exploited_text, threat_text

GOOD, GARBAGE = 0.05, 3.0  # reconstruction noise: well above the floor / below it (clamped noise)
TOPK10 = "topk:ratio=0.1,error_feedback=true"
TOPK1 = "topk:ratio=0.01,error_feedback=true"
SIGN = "signsgd:error_feedback=true"
DLG = "dlg:iterations=300,preset=None"
IG = "ig:iterations=4800,tv=0.01"
FEATURE = "feature:iterations=1500,restarts=2"
FEATURE_EXTRA = {"layers_used": [{"layer": "fc", "features": 768, "known": 77, "method": "masked bias ratio"}],
                 "feature_error_estimate": 0.007}  # fmt: skip
# defense -> attack -> per-record noise levels (two records of 4 images)
PLAN = {
    "none": {DLG: (GOOD, GOOD), IG: (0.03, 0.03)},
    # IG: 4 perfect images and 4 noise: the higher mean SSIM, but only 4 of 8 beat the floor; DLG beats it 8 of 8
    TOPK10: {DLG: (0.12, 0.12), IG: (0.0, GARBAGE)},
    # gradient matching finds nothing; the feature attack (structure-aware) recovers every image
    TOPK1: {DLG: (GARBAGE, GARBAGE), FEATURE: (GOOD, GOOD)},
    SIGN: {DLG: (GARBAGE, GARBAGE), IG: (GARBAGE, GARBAGE)},
}
SPELLINGS = ["none", "topk:ratio=0.1", "topk:ratio=0.01", "signsgd"]


def _write(root: Path) -> None:
    gen = torch.Generator().manual_seed(7)
    origs = [originals(gen, 4) for _ in range(2)]
    labels = torch.tensor([1, 2, 3, 4])
    for d_i, (defense, attacks) in enumerate(PLAN.items()):
        for a_i, (attack, levels) in enumerate(attacks.items()):
            for r_i, level in enumerate(levels):
                extra = {"threat": {"model": "white-box", "public_state_used": [], "residual": None}}
                if attack.startswith("feature"):
                    extra["extra"] = FEATURE_EXTRA
                write_result(root / "runs" / f"d{d_i}" / f"r{r_i}" / f"a{a_i}", gen, origs[r_i], labels, level,
                             record_id=f"r{r_i}-d{d_i}", record="", dataset="photos", model="lenet", defense=defense,
                             attack=attack, view="aware", nbytes=1000 // (d_i + 1), bytes_fp32=1000, extra=extra)  # fmt: skip
    # a table that does not separate defenses (one setting): sorts after, although its name comes first
    for r_i, orig in enumerate(origs):
        write_result(root / "runs" / "aaa" / f"r{r_i}", gen, orig, labels, GOOD, record_id=f"aaa{r_i}", record="",
                     dataset="aaa", model="lenet", defense="none", attack=DLG, view="aware", nbytes=1000,
                     bytes_fp32=1000)  # fmt: skip
    (root / "study.toml").write_text('name = "t"\ndefenses = [' + ", ".join(f'"{s}"' for s in SPELLINGS) + "]\n")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("decides")
    _write(root)
    out = make_report(ReportOptions(runs=(root / "runs",), out=root / "out", compute_lpips=False))
    return root, out


def _rows(out):
    heads = headline(out.data)
    return heads, {r.defense: r for r in heads[0].rows}


def test_a_setting_leaks_when_any_attacker_beats_the_floor(study) -> None:
    _, out = study
    heads, rows = _rows(out)
    row = rows[TOPK10]
    by_attack = {r.attack: r for r in heads[0].group.rows if r.defense == TOPK10}
    # the premise: IG has the higher mean SSIM, the old rule's pick, and on its own would not be a leak
    assert by_attack[IG].ssim.mean > by_attack[DLG].ssim.mean
    assert by_attack[IG].verdict.beats == 4
    assert row.strongest.attack == DLG and row.verdict.verdict == stats.LEAKS and row.verdict.beats == 8
    assert row.verdict.level == pytest.approx(0.05 / 2)
    assert rows[SIGN].verdict.verdict == stats.FLOOR


def test_summary_sentence_names_what_leaks_and_what_does_not(study) -> None:
    _, out = study
    md = (study[0] / "out" / "report.md").read_text()
    first = md.split("\n")[2]
    assert first.startswith("**Leak: ")
    leak, rest = first.split("; no leak shown", 1)
    for name in ("'none'", "'topk:ratio=0.1'", "'topk:ratio=0.01'"):
        assert name in leak and name not in rest
    assert "'signsgd'" in rest and "'signsgd'" not in leak
    assert summary_sentence(headline(out.data)) in md.replace("\\_", "_")


def test_structure_aware_leak_is_said_in_the_sections_first_paragraph(study) -> None:
    root, out = study
    heads, rows = _rows(out)
    assert rows[TOPK1].strongest.attack == FEATURE and rows[TOPK1].verdict.verdict == stats.LEAKS
    assert rows[TOPK1].matching_verdict.verdict == stats.FLOOR
    note = structure_note(heads[0])
    assert "'topk:ratio=0.01'" in note and "feature" in note and "'none'" not in note
    md = (root / "out" / "report.md").read_text()
    section = md.split("### photos / lenet", 1)[1].lstrip("\n")
    assert section.startswith("1 compressed setting(s) leak under a structure-aware attacker")
    # the threat line says what the feature attack exploited, read from result.json's extra
    assert "exploited: exact layers: fc (77 of 768 features, masked bias ratio)" in md
    page = (root / "out" / "report.html").read_text()
    assert page.index("leak under a structure-aware attacker") < page.index("<table")


def test_defense_names_are_the_studys_spellings(study) -> None:
    root, out = study
    assert study_spellings([root / "runs"]) == tuple(SPELLINGS)
    heads, _ = _rows(out)
    assert sorted(r.shown for r in heads[0].rows) == sorted(SPELLINGS)
    md = (root / "out" / "report.md").read_text()
    assert "<code>topk</code>" not in md and "<code>topk:ratio=0.01</code>" in md


def test_display_names_without_a_study_keep_the_parameters_that_differ() -> None:
    specs = [TOPK1, TOPK10, "powersgd:rank=1,warm_start=true"]
    short = {TOPK1: "topk", TOPK10: "topk:ratio=0.1", specs[2]: "powersgd"}
    names = display_names(specs, (), short)
    assert names == {TOPK1: "topk:ratio=0.01", TOPK10: "topk:ratio=0.1", specs[2]: "powersgd"}
    # a spelling naming two settings names neither; the most specific spelling wins
    assert display_names([TOPK1, TOPK10], ["topk"], short)[TOPK1] == "topk:ratio=0.01"
    assert display_names([TOPK1, TOPK10], ["topk", "topk:ratio=0.1"], short) == {TOPK1: "topk", TOPK10: "topk:ratio=0.1"}
    assert display_names(["topk:ratio=0.1"], ["topk:ratio=0.10"]) == {"topk:ratio=0.1": "topk:ratio=0.10"}


def test_threat_text_and_full_specs_print_no_empty_or_none_values(study) -> None:
    root, _ = study
    assert threat_text({"public_state_used": [], "labels": "idlg", "residual": None}) == (
        "public_state_used: none; labels: idlg; residual: none"
    )
    assert full_spec("dlg:iterations=3,preset=None,lr=1.0") == "dlg:iterations=3,lr=1.0"
    assert exploited_text({"layer": "fc1", "rows_used": 3, "rows": 10}) == "layer fc1: 3 of 10 exact rows"
    assert exploited_text({}) == ""
    assert exploited_text({"feature_error_estimate": 0.007}) == "feature error (its own estimate) 0.7 %"
    assert exploited_text({"feature_error_estimate": 1.7e-8}) == "feature error (its own estimate) 1.7e-08"
    for name in ("report.md", "report.html"):
        text = (root / "out" / name).read_text()
        assert "=None" not in text and ": ;" not in text and "used: ;" not in text


def test_tables_that_separate_defenses_come_first(study) -> None:
    root, out = study
    heads = headline(out.data)
    assert [h.dataset for h in heads] == ["photos", "aaa"]
    assert [g.dataset for g in out.data.groups] == ["aaa", "photos"]  # alphabetical, before the headline orders them
    md = (root / "out" / "report.md").read_text()
    assert md.index("### photos / lenet") < md.index("### aaa / lenet")


def test_training_run_tables_come_after_the_captures(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    orig, labels = originals(gen, 4), torch.arange(4)
    for name, source in (("a-train", "train"), ("b-capture", "capture")):
        write_result(tmp_path / name, gen, orig, labels, GOOD, record_id=name, record="", dataset=name, model="m",
                     defense="none", attack=DLG, view="naive", nbytes=10, bytes_fp32=10,
                     extra={"schema": 2, "source": source, "step": 0})  # fmt: skip
    heads = headline(build_report(load_runs([tmp_path])))
    assert [h.dataset for h in heads] == ["b-capture", "a-train"]


def test_frontier_ignores_differences_within_noise() -> None:
    est = lambda p, se=0.01: stats.Estimate(p, se, 1, 1000, "binomial")  # noqa: E731
    points = [(100.0, est(0.90)), (1000.0, est(0.91)), (10.0, est(0.70)), (5000.0, est(0.96))]
    # 0.91 vs 0.90 is within noise: paying 10x the bytes for it is not on the frontier
    assert noisy_frontier(points) == [2, 0, 3]
    assert noisy_frontier([(1.0, est(0.9, None)), (2.0, est(0.95, None))]) == [0, 1]  # no error: means decide


def test_accuracy_figure_has_its_own_heading_error_bars_and_a_true_caption(tmp_path: Path) -> None:
    write_fixture(tmp_path)
    for d, acc in (("none", 0.90), ("topk:ratio=0.01", 0.895)):
        write_train_metrics(tmp_path / "acc" / d, dataset="photos", model="convnet", defense=d, accuracies=[acc],
                            steps_per_epoch=10, bytes_per_step=1000 if d == "none" else 10, test_examples=500)  # fmt: skip
    out = make_report(ReportOptions(runs=(tmp_path / "runs",), train=(tmp_path / "acc",), out=tmp_path / "out",
                                    compute_lpips=False))  # fmt: skip
    (fig,) = [f for f in out.figures if f.kind == "accuracy"]
    assert "standard error" in fig.caption
    # the two runs are within noise: the cheaper one alone is the frontier, drawn as a circle, not a dashed line
    assert "dashed" not in fig.caption and "open circle" in fig.caption
    md = (tmp_path / "out" / "report.md").read_text()
    heading = md.index("### Accuracy vs bandwidth")
    assert heading < md.index("## Threat model") and md.index("accuracy-vs-bandwidth.png") > heading
    assert "accuracy-vs-bandwidth.png" not in md.split("## Details", 1)[1]
    for f in out.figures:
        if f.kind == "privacy":
            drawn = "dashed" in f.caption or "open circle" in f.caption
            assert drawn  # each privacy figure names the frontier it draws, and only that


def _longest_white_band(path: Path) -> int:
    a = np.asarray(Image.open(path).convert("L"))
    best = 0
    for axis in (0, 1):
        run = 0
        for white in (a >= 250).all(axis=axis):
            run = run + 1 if white else 0
            best = max(best, run)
    return best


def test_grids_have_no_blank_bands(tmp_path: Path) -> None:
    write_fixture(tmp_path)
    out = make_report(ReportOptions(runs=(tmp_path / "runs",), out=tmp_path / "out", compute_lpips=False))
    grids = [f for f in out.figures if f.kind == "grid" and "dlg" in f.path.name]
    assert grids
    for f in grids:
        assert _longest_white_band(f.path) < 40, f.path.name  # was ~100 px between the title and the images


def test_build_report_is_short_and_report_files_stay_under_600_lines() -> None:
    assert len(inspect.getsource(build_report_fn).splitlines()) <= 80
    folder = Path(build_report_fn.__code__.co_filename).parent
    for path in folder.glob("*.py"):
        assert len(path.read_text().splitlines()) < 600, path.name


def test_structure_note_when_only_structure_aware_attackers_ran(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    orig, labels = originals(gen, 4), torch.arange(4)
    write_result(tmp_path / "f", gen, orig, labels, GOOD, record_id="f", record="", dataset="photos", model="lenet",
                 defense="none", attack=FEATURE, view="naive", nbytes=10, bytes_fp32=10)  # fmt: skip
    (g,) = headline(build_report(load_runs([tmp_path])))
    assert structure_note(g).startswith("Only structure-aware attackers ('feature') ran on this table")
