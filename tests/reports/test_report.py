"""The reporter on a small synthetic fixture of results (see report_fixture.py: fixture data, not results)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from report_fixture import ATTACKS, BATCH, BYTES_FP32, DEFENSES, VIEWS, write_fixture
from typer.testing import CliRunner

from gia_bench.cli import app
from gia_bench.errors import GiaBenchError
from gia_bench.metrics import mean_colour_floor
from gia_bench.reports import (
    THREAT_MODEL,
    ReportOptions,
    frontier,
    load_runs,
    make_report,
    parse_result,
)
from gia_bench.reports.load import MalformedFile
from gia_bench.reports.tables import short_spec
from gia_bench.reports.writers import md_text


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> tuple[Path, dict[str, list[Path]]]:
    root = tmp_path_factory.mktemp("fixture")
    return root, write_fixture(root)


@pytest.fixture(scope="module")
def report(fixture_dir, tmp_path_factory):
    root, _ = fixture_dir
    out = tmp_path_factory.mktemp("report")
    options = ReportOptions(runs=(root / "runs",), out=out, train=(root / "train",), compute_lpips=False)
    return out, make_report(options)


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def md_rows(md: str) -> list[list[str]]:
    """The cells of every Markdown table row, as plain text (main line only, escapes undone)."""
    rows = []
    for line in md.splitlines():
        if not line.startswith("| ") or set(line) <= set("|:- "):
            continue
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        out = []
        for c in cells:
            c = c.strip().split("<br>", 1)[0]
            c = re.sub(r"</?code>|\*\*", "", c)
            out.append(html.unescape(re.sub(r"\\(.)", r"\1", c)))
        rows.append(out)
    return rows


def html_rows(page: str) -> list[list[str]]:
    """The cells of every HTML table row, as plain text (the main line of each cell)."""
    rows = []
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", page, flags=re.DOTALL):
        cells = []
        for td in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", tr, flags=re.DOTALL):
            main = re.sub(r'<span class="sub">.*?</span>', "", td, flags=re.DOTALL)
            cells.append(html.unescape(re.sub(r"<[^>]+>", "", main)).strip())
        rows.append(cells)
    return rows


def test_every_defense_row_in_summary_markdown_and_html(report) -> None:
    out, output = report
    rows = _csv(out / "summary.csv")
    assert len(rows) == len(DEFENSES) * len(ATTACKS) * len(VIEWS)
    assert {(r["defense"], r["attack"], r["view"]) for r in rows} == {
        (d, a, v) for d in DEFENSES for a in ATTACKS for v in VIEWS
    }
    assert len(_csv(out / "results.csv")) == len(rows) * BATCH
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    views = set(VIEWS)
    for doc_rows in (md_rows(md), html_rows(page)):
        detail = [r[:3] for r in doc_rows if len(r) >= 9 and r[2] in views]
        headline_rows = [r[0] for r in doc_rows if len(r) == 11]
        for d in DEFENSES:
            # every defense x attack x view appears exactly once as a row of the details table ...
            for a in ATTACKS:
                for v in VIEWS:
                    assert detail.count([short_spec(d, "defense"), short_spec(a, "attack"), v]) == 1, (d, a, v)
            # ... and every defense once in the headline table (after its header row)
            assert headline_rows.count(short_spec(d, "defense")) == 1, d
        assert len(detail) == len(DEFENSES) * len(ATTACKS) * len(VIEWS)
    for d in DEFENSES:
        assert md_text(d) in md and html.escape(d) in page  # the full spec is there too
    assert THREAT_MODEL in md and THREAT_MODEL in html.unescape(page)
    assert "naive" in md and "aware" in md
    assert "Floor (a flat image" in md and "Floor (a flat image" in page
    # LPIPS is missing in the fixture: the report says so instead of inventing a number
    assert "LPIPS not computed" in md and "LPIPS not computed" in page
    assert all(r["lpips_mean"] == "" for r in rows)
    # the report opens with the banner and the one-row-per-defense table, the details come later, collapsed
    assert md.index("At a glance") < md.index("## Threat model") < md.index("<details>")
    assert page.index("At a glance") < page.index("Threat model and attack budgets") < page.index("<details>")
    assert "<details open" not in page


def test_summary_numbers_match_the_per_image_rows(report, fixture_dir) -> None:
    out, _ = report
    images = _csv(out / "results.csv")
    for row in _csv(out / "summary.csv"):
        mine = [r for r in images if (r["defense"], r["attack"], r["view"]) == (row["defense"], row["attack"], row["view"])]
        ssim = [float(r["ssim"]) for r in mine]
        psnr = [float(r["psnr"]) for r in mine]
        assert float(row["ssim_mean"]) == pytest.approx(sum(ssim) / len(ssim))
        assert float(row["ssim_worst"]) == pytest.approx(max(ssim))  # worst case = most leakage
        assert float(row["psnr_worst"]) == pytest.approx(max(psnr))
        m = sum(ssim) / len(ssim)
        assert float(row["ssim_spread"]) == pytest.approx(math.sqrt(sum((s - m) ** 2 for s in ssim) / len(ssim)))
        nbytes = DEFENSES[row["defense"]][0]
        assert float(row["bytes_per_step"]) == nbytes
        assert float(row["compression_ratio"]) == pytest.approx(BYTES_FP32 / nbytes)
        acc = DEFENSES[row["defense"]][2]
        assert (row["test_accuracy"] == "") == (acc is None)
        if acc is not None:
            assert float(row["test_accuracy"]) == pytest.approx(acc) and row["accuracy_model"] == "convnet"
        expected_labels = 0.75 if row["defense"].startswith("topk") and row["view"] == "naive" else 1.0
        assert float(row["label_accuracy"]) == pytest.approx(expected_labels)
    # floors: recomputed from the stored originals, they match the definition
    root, written = fixture_dir
    from safetensors.torch import load_file

    orig = load_file(str(written["results"][0].parent / "reconstruction.safetensors"))["original"]
    floor = mean_colour_floor(orig)
    first = [r for r in images if r["result"] == str(written["results"][0])]
    assert [float(r["floor_ssim"]) for r in first] == pytest.approx([f[0] for f in floor])
    assert [float(r["floor_psnr"]) for r in first] == pytest.approx([f[1] for f in floor])
    # the reconstructions of the undefended runs beat the floor by far, Top-k's much less
    summary = {(r["defense"], r["attack"], r["view"]): r for r in _csv(out / "summary.csv")}
    assert float(summary[("none", ATTACKS[0], "naive")]["ssim_mean"]) > 0.9
    assert float(summary[("none", ATTACKS[0], "naive")]["floor_ssim"]) < 0.3


def test_figures_exist_and_are_valid_pngs(report) -> None:
    out, output = report
    kinds = [f.kind for f in output.figures]
    assert kinds.count("privacy") == 1 and kinds.count("accuracy") == 1
    assert kinds.count("grid") == len(ATTACKS) * len(VIEWS)
    for f in output.figures:
        assert f.path.is_file() and f.path.stat().st_size > 0
        with Image.open(f.path) as img:
            img.verify()
        with Image.open(f.path) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    # the lost image file is noted in its grid's caption, not fatal
    missing = [f for f in output.figures if f.kind == "grid" and "missing" in f.caption]
    assert len(missing) == 1 and "qsgd" in missing[0].caption


def test_html_is_self_contained(report) -> None:
    out, output = report
    page = (out / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == len(output.figures)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1])
        with Image.open(io.BytesIO(raw)) as img:
            img.verify()
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)
    assert "<link" not in page


def test_malformed_files_are_listed_with_the_reason_and_skipped(report, fixture_dir) -> None:
    out, output = report
    _, written = fixture_dir
    skipped = {s.path: s.reason for s in output.data.runs.skipped}
    assert set(skipped) == set(written["malformed"])
    by_name = {p.parent.name: r for p, r in skipped.items()}
    assert "not valid JSON" in by_name["truncated"]
    assert "kind is 'record'" in by_name["wrongkind"]
    assert "missing field" in by_name["nofield"]
    assert "'psychic'" in by_name["badview"]
    md = (out / "report.md").read_text()
    assert "## Skipped files" in md
    for p in written["malformed"]:
        assert str(p) in md
    assert len(output.data.runs.results) == len(written["results"])


def test_parse_result_rejects_inconsistent_scores(fixture_dir, tmp_path: Path) -> None:
    _, written = fixture_dir
    data = json.loads(written["results"][0].read_text())
    for mutate, message in (
        (lambda d: d["scores"]["images"].pop(), "scored images for batch_size"),
        (lambda d: d["scores"]["images"][0].update(ssim=3.0), "out-of-range"),
        (lambda d: d.update(bytes="many"), "field 'bytes' is str"),
        (lambda d: d.update(schema=7), "schema 7"),
    ):
        d = json.loads(json.dumps(data))
        mutate(d)
        path = tmp_path / "result.json"
        path.write_text(json.dumps(d))
        with pytest.raises(MalformedFile, match=message):
            parse_result(path)
    # an infinite PSNR (exact reconstruction) written by json.dump is read back as inf
    d = json.loads(json.dumps(data))
    d["scores"]["images"][0]["psnr"] = math.inf
    path.write_text(json.dumps(d))
    assert parse_result(path).scores.images[0].psnr == math.inf


def test_short_spec_drops_defaults_only() -> None:
    from gia_bench.attacks import ATTACKS
    from types import SimpleNamespace

    from gia_bench.registry import describe_params, display_spec
    from gia_bench.reports.tables import learn_shown

    defaults = {p.name: p.default for p in describe_params(ATTACKS.get("dlg"))}
    other_lr = float(defaults["lr"]) + 1.0
    full = f"dlg:iterations={defaults['iterations']},lr={other_lr}"
    # the writer decides it with the registry (reports import none) ...
    assert display_spec(full, ATTACKS) == f"dlg:lr={other_lr}"
    assert display_spec("no-such-attack:x=1", ATTACKS) == "no-such-attack:x=1"
    # ... and reports show what loaded results said, else the spec whole (less unset parameters)
    assert short_spec(full + ",preset=None", "attack") == full
    learn_shown([SimpleNamespace(attack=full, defense="none", shown={"attack": display_spec(full, ATTACKS)})])
    assert short_spec(full, "attack") == f"dlg:lr={other_lr}"


def test_frontier_is_the_non_dominated_set() -> None:
    pts = [(10.0, 0.9), (1.0, 0.5), (5.0, 0.2), (5.0, 0.6), (100.0, 0.1), (50.0, 0.3)]
    assert frontier(pts) == [1, 2, 4]


def test_load_runs_reports_missing_paths(tmp_path: Path) -> None:
    runs = load_runs([tmp_path / "nowhere"])
    assert runs.results == () and [s.reason for s in runs.skipped] == ["no such file or folder"]


def test_load_runs_finds_training_runs_under_the_runs(fixture_dir) -> None:
    root, written = fixture_dir
    runs = load_runs([root])  # results and training runs below one folder, no --train
    assert {t.path for t in runs.trains} == set(written["train"])
    assert len(runs.results) == len(written["results"])
    assert {t.defense: t.final_test_accuracy for t in runs.trains} == {
        d: acc for d, (_, _, acc) in DEFENSES.items() if acc is not None
    }


def test_report_fills_lpips_from_stored_images(fixture_dir, tmp_path: Path) -> None:
    """With trunk weights (RANDOM here, test only: they prove the path, not a meaningful score)."""
    import torchvision

    net = torchvision.models.alexnet()
    gen = torch.Generator().manual_seed(0)
    state = {f"features.{k}": torch.randn(v.shape, generator=gen) * 0.05 for k, v in net.features.state_dict().items()}
    weights = tmp_path / "alexnet-random-test-only.pth"
    torch.save(state, weights)
    root, _ = fixture_dir
    only = tmp_path / "runs"
    shutil.copytree(root / "runs" / "d0", only / "d0")  # one defense keeps it quick
    out = make_report(ReportOptions(runs=(only,), out=tmp_path / "out", lpips_weights=weights))
    rows = _csv(tmp_path / "out" / "summary.csv")
    assert rows and all(r["lpips_mean"] not in ("", "nan") and float(r["lpips_mean"]) >= 0 for r in rows)
    assert out.data.lpips_notes == ()


def test_cli_report(fixture_dir, tmp_path: Path) -> None:
    root, _ = fixture_dir
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(root / "runs"), "--train", str(root / "train"), "--out", str(tmp_path / "o"), "--no-lpips"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "report.html").is_file() and (tmp_path / "o" / "summary.csv").is_file()
    assert "skipped" in res.output and "not valid JSON" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["report", str(empty), "--out", str(tmp_path / "o2")])
    assert isinstance(res.exception, GiaBenchError) and "no attack results" in str(res.exception)
    # through the real entry point: one red line, exit code 2
    script = Path(sys.executable).with_name("gia-bench")
    proc = subprocess.run(
        [str(script), "report", str(empty), "--out", str(tmp_path / "o2"), "--lpips-weights", str(tmp_path / "nope.pth")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--lpips-weights" in proc.stderr and "Traceback" not in proc.stderr


# -- headless browser ------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARTIFACTS = "GIA_BENCH_ARTIFACTS"  # where the browser test leaves its screenshots (default: pytest's tmp dir)


def _chromium(page: Path, profile: Path, *args: str) -> list[str]:
    return [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args, page.resolve().as_uri(),
    ]  # fmt: skip


def _page_checks(page: Path, profile: Path, width: int = 1280) -> dict[str, str]:
    """Open ``page`` in headless Chromium at ``width`` px; return what the report's load script measured."""
    cmd = _chromium(page, profile, f"--window-size={width},900", "--dump-dom")
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    root = re.search(r"<html[^>]*>", dom)
    found = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', root.group(0) if root else ""))
    assert "images-loaded" in found, f"the page's load script did not run; DOM starts: {dom[:300]!r}"
    return found


def _images_loaded(page: Path, profile: Path) -> str:
    """The report's own count of decoded images ("ok/total")."""
    return _page_checks(page, profile)["images-loaded"]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install -y chromium)")
def test_html_opens_in_headless_chromium_with_every_image_loaded(report, tmp_path: Path) -> None:
    out, output = report
    n = len(output.figures)
    assert _images_loaded(out / "report.html", tmp_path / "profile") == f"{n}/{n}"
    # the check can fail: a report with a corrupt image counts it as not loaded
    broken = (out / "report.html").read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    (tmp_path / "broken.html").write_text(broken)
    assert _images_loaded(tmp_path / "broken.html", tmp_path / "profile2") == f"{n - 1}/{n}"


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install -y chromium)")
def test_demo_like_report_fits_1280_px_and_is_screenshotted(tmp_path: Path, capsys) -> None:
    """No horizontal overflow at 1280 px, collapsed or with every section open; a screenshot as an artifact."""
    from report_fixture import write_demo_like

    write_demo_like(tmp_path / "fixture")
    out = tmp_path / "out"
    options = ReportOptions(
        runs=(tmp_path / "fixture" / "runs", tmp_path / "fixture" / "runs-train"),
        train=(tmp_path / "fixture" / "train", tmp_path / "fixture" / "trainruns"),
        out=out,
        compute_lpips=False,
    )
    output = make_report(options)
    page = out / "report.html"
    text = page.read_text()
    opened = out / "report-open.html"
    opened.write_text(text.replace("<details>", "<details open>"))
    heights = {}
    for name, path in (("collapsed", page), ("every section open", opened)):
        got = _page_checks(path, tmp_path / f"profile-{len(heights)}")
        # the page is exactly as wide as the window, and nothing (a table, a spec, a figure) reaches past it
        assert got["scroll-width"] == got["viewport-width"], (name, got)
        assert got["overflowing"] == "0", (name, got)
        heights[name] = int(got["page-height"])
    n = len(output.figures)
    assert _page_checks(opened, tmp_path / "profile-x")["images-loaded"] == f"{n}/{n}"
    assert heights["collapsed"] < heights["every section open"] / 2
    # the check can fail: a table wider than the window is caught
    wide = out / "report-wide.html"
    wide.write_text(text.replace("</style>", "table { min-width: 1600px; }</style>"))
    got = _page_checks(wide, tmp_path / "profile-wide")
    assert got["scroll-width"] != got["viewport-width"] or got["overflowing"] != "0"
    # the screenshot: the whole collapsed page at 1280 px
    shots = Path(os.environ.get(ARTIFACTS) or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "report-demo-like-1280.png"
    cmd = _chromium(page, tmp_path / "profile-shot", "--hide-scrollbars", f"--window-size=1280,{heights['collapsed']}",
                    f"--screenshot={shot}")  # fmt: skip
    subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1280, heights["collapsed"])
    with capsys.disabled():
        print(f"\nscreenshot: {shot} (page height at 1280 px: {heights['collapsed']} px collapsed,"
              f" {heights['every section open']} px with every section open)")  # fmt: skip
