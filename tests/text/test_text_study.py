"""A text study end to end on the small random BERT: captures, attacks, a training run, and the report's text section."""

from pathlib import Path

from gia_bench.study import StudyOptions, parse_study, run_study
from gia_bench.study.plan import cell_dataset

STUDY = {
    "name": "tiny-text",
    "datasets": ["pii"],
    "models": ["transformer:d=96,layers=3"],
    "batch_sizes": [1],  # dager on this random BERT splits B = 2 badly (1 position found); B = 1 is exact
    "images": 6,  # 6 sentences: one attacker setting needs 5 for the sign test to say "leaks"
    "model_mode": "eval",
    "defenses": ["none", "topk:ratio=0.01"],
    "attacks": ["dager"],
    "views": ["naive"],
    "train": {"dataset": "pii:size=40", "model": "transformer:d=96,layers=3", "epochs": 1, "batch_size": 8,
              "defenses": ["none"]},
}


def test_a_text_data_set_takes_the_models_tokenizer_unless_it_names_one():
    assert cell_dataset("pii", "smollm2") == "pii:tokenizer=smollm2"
    assert cell_dataset("topics:length=24", "smollm2:task=lm") == "topics:tokenizer=smollm2,length=24"
    assert cell_dataset("pii", "minilm") == "pii"  # bert: the data set's default
    assert cell_dataset("pii:tokenizer=bert", "smollm2") == "pii:tokenizer=bert"  # as written: the model refuses it
    assert cell_dataset("digits", "smollm2") == "digits"  # images have no tokenizer


def test_tiny_text_study_reports_a_verdict_per_defense_against_the_token_bag_floor(tmp_path: Path):
    config = parse_study(STUDY, "tiny.toml")
    out = tmp_path / "study"
    st = run_study(config, out, StudyOptions(workers=1))
    assert not st.failures, st.failures
    md = (out / "report" / "report.md").read_text()
    html = (out / "report" / "report.html").read_text()
    text_head = md.index("(text)")
    section = md[text_head : md.index("**How the verdicts are made.**")]
    assert "token bag in random order" in section and "ROUGE-1 1 by construction" in section
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| <code>")}
    assert set(rows) == {"<code>none</code>", "<code>topk</code>"}  # named as the image tables name them
    # DAGER recovers the uncompressed sentences (word order beyond the bag); Top-k 1 % leaves it nothing
    assert "**leaks**<br><sub>6/6 beat the floor" in rows["<code>none</code>"]
    assert "indistinguishable from the floor" in rows["<code>topk</code>"]
    assert "%" in rows["<code>none</code>"].split("|")[4]  # the training run's test accuracy
    # each reconstruction beside its original, recovered tokens in brackets, escaped in both documents
    assert "\\[\\[CLS\\]\\]" in md and "[[CLS]]" in html and "Reconstructions beside their originals" in html
    csv_lines = (out / "report" / "text.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * 6 and "floor_rouge2" in csv_lines[0]
    assert (out / "report" / "results.csv").read_text().count("\n") == 1  # no text result among the images


def test_the_builtin_text_study_runs_tag_on_minilm_only():
    from gia_bench.study import load_study, plan_units

    config = load_study("text")
    assert config.attacks_for("minilm") == config.attacks and len(config.attacks) == 3
    assert not any(a.startswith("tag") for a in config.attacks_for("smollm2"))
    jobs = [u.args["job"] for u in plan_units(config, Path("o")) if u.kind == "attack"]
    tag = {j.record.split("/")[1] for j in jobs if j.attack.startswith("tag")}
    assert tag and all("-minilm-" in group for group in tag)
