"""The shipped LQ-SGD paper study: what it covers, and a tiny 1-epoch copy run end to end to its claims table."""

from __future__ import annotations

import json
import re

from gia_bench.reports.claims import Setting
from gia_bench.study import STUDIES_DIR, StudyOptions, load_study, prepare, run_study

PAPER = load_study("lqsgd-paper")
PAPER_PATH = STUDIES_DIR / "lqsgd-paper.toml"


def test_paper_study_has_the_three_experiments():
    train = PAPER.train
    assert train is not None and len(train.run_seeds) >= 3  # standard errors over seeds
    trained = {(s.family, s.rank) for s in map(Setting.of, train.defenses or ())}
    assert trained == {("none", None)} | {(f, r) for f in ("powersgd", "lqsgd") for r in (1, 2, 4, 7)}
    assert all("bits=8" in d for d in train.defenses if d.startswith("lqsgd"))
    assert train.base.epochs >= 8 and train.base.model == "convnet:width=16"  # trained to convergence (issue 26)
    assert {Setting.of(d) for d in PAPER.defenses} == {Setting("none", None), Setting("powersgd", 1), Setting("lqsgd", 1)}
    assert {a.split(":")[0] for a in PAPER.attacks} == {"dlg", "ig", "feature", "analytic"}
    assert PAPER.images >= 7  # the sign test's minimum at its Bonferroni level


def _tiny() -> str:
    """lqsgd-paper.toml cut to seconds: 1 epoch of 3 steps on 2 workers (one worker sends nothing), 2 seeds, ranks 1
    and 2, one image, two attacks."""
    text = (PAPER_PATH.read_text()
            .replace("images = 7", "images = 1")
            .replace('models = ["mlp:hidden=64"]', 'models = ["mlp:hidden=16"]')
            .replace('model = "convnet:width=16"', 'model = "mlp:hidden=16"\nmax_steps_per_epoch = 3')
            .replace("epochs = 8", "epochs = 1")
            .replace('"powersgd:rank=4", "powersgd:rank=7",', "")
            .replace('"lqsgd:rank=4,bits=8", "lqsgd:rank=7,bits=8",', "")
            .replace('views = ["naive", "aware"]', 'views = ["aware"]'))  # fmt: skip
    text = re.sub(r"attacks = \[[^\]]*\]", 'attacks = ["dlg:iterations=2", "analytic"]', text, count=1, flags=re.S)
    return text.replace("seeds = [0, 1, 2]", "seeds = [0, 1]")


def test_tiny_paper_study_writes_the_claims_table_from_its_own_runs(tmp_path):
    study = tmp_path / "paper.toml"
    study.write_text(_tiny())
    out = tmp_path / "out"
    config = prepare(study, out)
    assert config.train is not None and len(config.train.defenses or ()) == 5
    st = run_study(config, out, StudyOptions(workers=1))
    assert st.failures == () and st.trains == (10, 10)
    metrics = {p.parent.relative_to(out / "train").as_posix(): json.loads(p.read_text())
               for p in out.glob("train/*/s*/metrics.json")}
    assert len(metrics) == 10 and {m["config"]["seed"] for m in metrics.values()} == {0, 1}
    md = (out / "report" / "claims.md").read_text()
    assert (out / "report" / "figures" / "claims-accuracy-vs-epoch.png").stat().st_size > 1000
    # claim 1's bytes figure is the runs' own: LQ-SGD r1's bytes over PowerSGD r1's, from metrics.json
    sent = {k: m["totals"]["bytes_sent_per_worker"] for k, m in metrics.items()}
    saved = 1 - sent["lqsgd_rank-1_bits-8/s0"] / sent["powersgd_rank-1/s0"]
    assert f"{100 * saved:.1f} % fewer bytes than PowerSGD r1" in md
    claims_table = md.split("## Convergence")[0]
    rows = [line for line in claims_table.splitlines() if line.startswith("| ") and "the paper's claim" not in line]
    assert len(rows) == 3, md  # bytes and accuracy, the rank sweep {1, 2}, gradient inversion
    assert "Rank sweep {1, 2}" in md and "gradient inversion" in md
    # the convergence table: one row per setting, two seeds each, epochs counted against SGD's final accuracy
    table = md.split("## Convergence")[1]
    assert sum(line.count("| 2 |") for line in table.splitlines()) == 5
