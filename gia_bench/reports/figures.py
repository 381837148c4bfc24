"""The report's figures (matplotlib, Agg backend, PNG, written atomically).

* privacy vs bandwidth, per dataset x model: SSIM and PSNR against bytes per step
  (log x), one marker per defense setting at the strongest attacker's mean (the
  attack and view with the highest mean over images), the mean-colour floor as a
  dotted line, and the non-dominated frontier: settings for which no other setting
  sends no more bytes and leaks no more (both lower is better for the defender);
* accuracy vs bandwidth: final test accuracy against bytes per step, from training runs;
* image grids, per dataset x model x attack x view: the originals in the first row,
  then each defense's reconstructions, the same original in each column;
* leakage vs training step, per dataset x model with results from training runs: per
  defense, SSIM and PSNR (mean and worst image of the strongest attacker at each step)
  against the optimizer step, the same run's test accuracy on a second axis, and the
  run's bytes per step in the panel title.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

from gia_bench.io import slug as io_slug
from gia_bench.reports import stats
from gia_bench.reports.io import write_atomic
from gia_bench.reports.load import AttackResult, TrainRun
from gia_bench.reports.tables import SummaryRow, TableGroup, short_spec

GRID_MAX_IMAGES = 8
PSNR_PLOT_CAP = 100.0  # an infinite PSNR (identical images) is drawn here, and said so


def _pyplot():
    """matplotlib's pyplot on the Agg backend, with a writable config folder."""
    if "MPLCONFIGDIR" not in os.environ:
        os.environ["MPLCONFIGDIR"] = str(Path(tempfile.gettempdir()) / "gia-bench-mpl")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@dataclasses.dataclass(frozen=True)
class Figure:
    """A figure written to ``path``."""

    path: Path
    kind: str  # "privacy", "accuracy", "grid" or "steps"
    title: str
    caption: str
    dataset: str = ""
    model: str = ""


def slug(*parts: str) -> str:
    """A file-name-safe name for a figure."""
    return io_slug("-".join(parts), keep="A-Za-z0-9._=-", fill="_", strip="_")[:150]


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return write_atomic(path, buf.getvalue())


def frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when both coordinates are to be minimised, by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    keep: list[int] = []
    best = math.inf
    for i in order:
        if points[i][1] < best:
            keep.append(i)
            best = points[i][1]
    return keep


def _log_x(ax, xs: Sequence[float]) -> None:
    """Log x axis in bytes, labelled at powers of ten only, with a margin around the points."""
    from matplotlib.ticker import LogLocator, NullFormatter

    xs = [x for x in xs if x > 0]
    if xs:  # limits first: an axis with no positive data yet would warn that it cannot be log-scaled
        ax.set_xlim(min(xs) / 2, max(xs) * 2)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("bytes sent per worker per step (log)")


def _strongest(rows: Sequence[SummaryRow], metric: str) -> dict[str, tuple[float, SummaryRow]]:
    """Per defense: the highest mean of ``metric`` over its attacks and views, and the row that has it.

    The oracle view is an upper bound, not an attacker: it never counts as the strongest.
    """
    out: dict[str, tuple[float, SummaryRow]] = {}
    for r in rows:
        if r.view == "oracle":
            continue
        s = getattr(r, metric)
        if s is None or math.isnan(s.mean):
            continue
        if r.defense not in out or s.mean > out[r.defense][0]:
            out[r.defense] = (s.mean, r)
    return out


def privacy_vs_bandwidth(
    group: TableGroup, out_dir: Path, picks: Mapping[str, SummaryRow | None] | None = None
) -> Figure | None:
    """SSIM and PSNR against bytes per step for one dataset x model; None when nothing was scored.

    ``picks``: each defense's strongest attacker as the headline table chose it (both panels
    then show that one attacker, as the table does); without it, the highest mean per metric.
    """
    if picks is not None:
        chosen = {d: r for d, r in picks.items() if r is not None}
        ssim_best = {d: (r.ssim.mean, r) for d, r in chosen.items() if r.ssim is not None and not math.isnan(r.ssim.mean)}
        psnr_best = {d: (r.psnr.mean, r) for d, r in chosen.items() if r.psnr is not None and not math.isnan(r.psnr.mean)}
    else:
        ssim_best, psnr_best = _strongest(group.rows, "ssim"), _strongest(group.rows, "psnr")
    if not ssim_best:
        return None
    plt = _pyplot()
    defenses = list(dict.fromkeys(r.defense for r in group.rows if r.defense in ssim_best))
    cmap = plt.get_cmap("tab10")
    markers = "os^Dv<>pPX*h"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    capped, drawn = False, set()
    for ax, best, label, floor in (
        (axes[0], ssim_best, "SSIM (strongest attack, mean over images)", group.floor_ssim),
        (axes[1], psnr_best, "PSNR dB (strongest attack, mean over images)", group.floor_psnr),
    ):
        pts = []
        for n, d in enumerate(defenses):
            if d not in best:
                continue
            y, row = best[d]
            if math.isinf(y):
                y, capped = PSNR_PLOT_CAP, True
            x = row.bytes_per_step
            pts.append((x, y))
            ax.scatter(
                [x], [y], s=60, color=cmap(n % 10), marker=markers[n % len(markers)], zorder=3,
                label=f"{group.shown(d)}  [{short_spec(row.attack, 'attack')}, {row.view}]",
            )  # fmt: skip
        idx = frontier(pts)
        if len(idx) > 1:
            fx, fy = [pts[i][0] for i in idx], [pts[i][1] for i in idx]
            ax.step(fx, fy, where="post", color="0.3", ls="--", lw=1, zorder=2, label="non-dominated frontier")
            drawn.add("dashed")
        elif idx:
            drawn.add("circle")
            ax.scatter([pts[idx[0]][0]], [pts[idx[0]][1]], s=180, facecolors="none", edgecolors="0.3",
                       zorder=2, label="non-dominated frontier")  # fmt: skip
        if floor is not None:
            ax.axhline(floor, color="0.5", ls=":", lw=1, label="mean-colour floor")
        _log_x(ax, [x for x, _ in pts])
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, fontsize=8, frameon=False)
    title = f"Privacy vs bandwidth: {group.dataset} / {group.model}"
    fig.suptitle(title)
    path = out_dir / f"privacy-{slug(group.dataset, group.model)}.png"
    _save(fig, path)
    how = "the headline table's strongest attacker" if picks is not None else "the attack and view with the highest mean"
    caption = (
        f"Each marker is one defense setting at its strongest attacker ({how}); lower is more private, further"
        " left is fewer bytes. " + _frontier_caption(drawn, "the settings no other setting beats on both bytes and leakage")
        + (" The dotted line is the mean-colour floor." if group.floor_ssim is not None else "")
        + (f" An infinite PSNR (exact reconstruction) is drawn at {PSNR_PLOT_CAP:g} dB." if capped else "")
    )
    return Figure(path, "privacy", title, caption, group.dataset, group.model)


def _frontier_caption(drawn: set[str], rule: str) -> str:
    """The caption's sentence for the frontier, naming only what was drawn; ``rule`` says who is on it."""
    if "dashed" in drawn and "circle" in drawn:
        return f"The dashed line (the open circle where one setting alone is on it) is the frontier: {rule}."
    if "dashed" in drawn:
        return f"The dashed line is the frontier: {rule}."
    if "circle" in drawn:
        return f"The open circle marks the one setting on the frontier: {rule}."
    return ""


def noisy_frontier(points: Sequence[tuple[float, stats.Estimate]]) -> list[int]:
    """Indices of the settings that buy accuracy with bytes: cheapest first, then each that beats the last kept beyond noise.

    A setting joins only when its accuracy is higher than the last one kept and the two
    are not within noise (:func:`gia_bench.reports.stats.not_different`; without a
    standard error the means decide). Differences within noise never bend the line.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1].mean))
    keep: list[int] = []
    for i in order:
        if not keep:
            keep.append(i)
            continue
        last = points[keep[-1]][1]
        acc = points[i][1]
        if acc.mean > last.mean and stats.not_different(acc, last) is not True:
            keep.append(i)
    return keep


def _settings(trains: Sequence[TrainRun]) -> list[tuple[TrainRun, stats.Estimate]]:
    """One point per training setting (dataset, model, defense): its runs' accuracy with a standard error."""
    from gia_bench.reports.tables import accuracy_of

    out: dict[tuple[str, str, str], tuple[TrainRun, stats.Estimate]] = {}
    for t in sorted(trains, key=lambda t: str(t.path)):
        key = (t.dataset, t.model, t.defense)
        if key not in out:
            out[key] = (t, accuracy_of(t, trains))  # type: ignore[assignment]
    return list(out.values())


def accuracy_vs_bandwidth(
    trains: Sequence[TrainRun], out_dir: Path, shown: Callable[[str], str] = str
) -> Figure | None:
    """Final test accuracy ± its standard error against bytes per step, one marker per training setting."""
    if not trains:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("tab10")
    by_setup: dict[tuple[str, str], list[tuple[TrainRun, stats.Estimate]]] = defaultdict(list)
    for t, est in _settings(trains):
        by_setup[(t.dataset, t.model)].append((t, est))
    markers = "os^Dv<>pPX*h"
    n, drawn, no_se = 0, set(), False
    for (dataset, model), points in sorted(by_setup.items()):
        points.sort(key=lambda p: p[0].bytes_per_step)
        for t, est in points:
            se = 0.0 if est.se is None else 100 * est.se
            no_se |= est.se is None
            ax.errorbar([t.bytes_per_step], [100 * est.mean], yerr=[se], fmt=markers[n % len(markers)], ms=7,
                        color=cmap(n % 10), capsize=3, zorder=3, label=f"{dataset}/{model}: {shown(t.defense)}")  # fmt: skip
            n += 1
        idx = noisy_frontier([(t.bytes_per_step, est) for t, est in points])
        if len(idx) > 1:
            ax.step([points[i][0].bytes_per_step for i in idx], [100 * points[i][1].mean for i in idx], where="post",
                    color="0.3", ls="--", lw=1, zorder=2)  # fmt: skip
            drawn.add("dashed")
        elif idx:
            i = idx[0]
            ax.scatter([points[i][0].bytes_per_step], [100 * points[i][1].mean], s=260, facecolors="none",
                       edgecolors="0.3", zorder=2)  # fmt: skip
            drawn.add("circle")
    _log_x(ax, [t.bytes_per_step for t in trains])
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8, frameon=False)
    title = "Accuracy vs bandwidth"
    fig.suptitle(title)
    path = out_dir / "accuracy-vs-bandwidth.png"
    _save(fig, path)
    caption = (
        "Final test accuracy of each training setting against the bytes a worker sent per step (a run with"
        " one worker: its messages' size); error bars:"
        " ± one standard error (binomial over the test set, or over seeds)."
        + (" Some runs did not record their test-set size: no error bar." if no_se else "")
        + " " + _frontier_caption(drawn, "the cheapest setting, then each that beats the last one on it by more than noise")
    )
    return Figure(path, "accuracy", title, caption.strip())


def _show(ax, img: torch.Tensor) -> None:
    arr = img.detach().clamp(0, 1).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        ax.imshow(arr[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(arr, interpolation="nearest")


def _image_key(img: torch.Tensor) -> str:
    return hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest()


_Cells = tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], list[str], list[str], set[str]]


def _grid_cells(by_defense: Mapping[str, Sequence[AttackResult]], order: Sequence[str]) -> _Cells:
    """Each result's stored images: (originals by column key, defense -> column key -> reconstruction,
    column keys in the order first seen, notes, defenses whose image files are missing). Columns are
    keyed by the original image itself (its bytes)."""
    g = SimpleNamespace(originals={}, cells=defaultdict(dict), appearance=[], notes=[], missing=set())
    for d in order:
        for res in by_defense[d]:
            rec, orig, note = res.load_images()
            if rec is None:
                if d not in g.missing:
                    g.notes.append(f"{d}: {note}")
                g.missing.add(d)
                continue
            for j in range(rec.shape[0]):
                key = _image_key(orig[j]) if orig is not None else f"{res.record_id}/{j}"
                if orig is not None:
                    g.originals.setdefault(key, orig[j])
                g.cells[d].setdefault(key, rec[j])
                if key not in g.appearance:
                    g.appearance.append(key)
    return g.originals, g.cells, g.appearance, g.notes, g.missing


def image_grid(
    results: Sequence[AttackResult], out_dir: Path, defense_order: Sequence[str], shown: Callable[[str], str] = str
) -> Figure | None:
    """Originals, then one row per defense; each column is one original image.

    ``results`` share dataset, model, attack and view. Columns are keyed by the original
    image itself (its bytes), so the same original heads a column in every row even when
    defenses captured it under different record ids; a defense that did not attack that
    image leaves its cell blank. Columns shared by the most defenses come first, at most
    :data:`GRID_MAX_IMAGES`. A missing image file leaves its row blank with a note.
    """
    if not results:
        return None
    first = results[0]
    by_defense: dict[str, list[AttackResult]] = defaultdict(list)
    for r in sorted(results, key=lambda r: (r.record_id, str(r.path))):
        by_defense[r.defense].append(r)
    order = [d for d in defense_order if d in by_defense] + [d for d in by_defense if d not in defense_order]
    originals, cells, appearance, notes, missing = _grid_cells(by_defense, order)
    if not appearance:
        return None
    shared = {k: sum(k in cells[d] for d in order) for k in appearance}
    columns = sorted(appearance, key=lambda k: (-shared[k], appearance.index(k)))[:GRID_MAX_IMAGES]
    plt = _pyplot()
    n_rows, n_cols = 1 + len(order), len(columns)
    height = 1.1 * n_rows + 0.4
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.1 * n_cols, height), squeeze=False)
    # the title gets 0.4 in above the images, not matplotlib's default 12 % of the figure (1.7 in on a tall grid)
    # and the images span the width (the row labels sit outside, kept by the tight bounding box), so square
    # cells fill the rows instead of leaving bands of white between them
    fig.subplots_adjust(wspace=0.05, hspace=0.08, top=1 - 0.4 / height, bottom=0.02 / height, left=0.01, right=0.99)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    axes[0][0].set_ylabel("original", rotation=0, ha="right", va="center", fontsize=8)
    for c, key in enumerate(columns):
        if key in originals:
            _show(axes[0][c], originals[key])
    if not originals:
        notes.append("no originals stored (no ground truth)")
    for i, d in enumerate(order, start=1):
        label = shown(d)
        for c, key in enumerate(columns):
            if key in cells[d]:
                _show(axes[i][c], cells[d][key])
        if d in missing:
            label += "\n(missing)"
            if not cells[d]:
                axes[i][0].text(0.05, 0.5, "no image file", transform=axes[i][0].transAxes, fontsize=7, color="0.4")
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    title = f"{first.dataset} / {first.model}: {short_spec(first.attack, 'attack')} ({first.view})"
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    path = out_dir / f"grid-{slug(first.dataset, first.model, short_spec(first.attack, 'attack'), first.view)}.png"
    _save(fig, path)
    caption = (
        "First row: originals; then each defense's reconstruction of the same image in each column"
        " (paired order; a blank cell: that defense's runs did not include that image)."
    )
    if notes:
        caption += " Notes: " + "; ".join(notes) + "."
    return Figure(path, "grid", title, caption, first.dataset, first.model)


def leakage_vs_step(group: TableGroup, trains: Sequence[TrainRun], out_dir: Path) -> Figure | None:
    """Leakage against training step with the run's accuracy on a second axis; None without training results."""
    from gia_bench.reports.tables import fmt_bytes

    rows = [r for r in group.rows if r.source == "train" and r.view != "oracle" and r.ssim is not None]
    if not rows:
        return None
    by_defense: dict[str, dict[int, SummaryRow]] = defaultdict(dict)
    for r in rows:
        best = by_defense[r.defense].get(r.step)
        if best is None or (r.ssim.mean, r.psnr.mean if r.psnr else 0) > (best.ssim.mean, best.psnr.mean if best.psnr else 0):  # type: ignore[union-attr]
            by_defense[r.defense][r.step] = r
    runs = {str(t.path): t for t in trains}
    plt = _pyplot()
    defenses = list(dict.fromkeys(r.defense for r in group.rows if r.defense in by_defense))
    fig, axes = plt.subplots(len(defenses), 2, figsize=(11, 2.6 * len(defenses) + 0.6), squeeze=False)
    capped = False
    for i, d in enumerate(defenses):
        points = sorted(by_defense[d].items())
        steps = [s for s, _ in points]
        run = next((runs[r.train_run] for _, r in points if r.train_run in runs), None)
        for j, (metric, label, floor) in enumerate(
            (("ssim", "SSIM", group.floor_ssim), ("psnr", "PSNR dB", group.floor_psnr))
        ):
            ax = axes[i][j]
            mean = [getattr(r, metric).mean for _, r in points]
            worst = [getattr(r, metric).worst for _, r in points]
            if any(math.isinf(v) for v in mean + worst):
                capped = True
                mean = [min(v, PSNR_PLOT_CAP) for v in mean]
                worst = [min(v, PSNR_PLOT_CAP) for v in worst]
            ax.plot(steps, mean, "o-", color="C0", label=f"{label} mean")
            ax.plot(steps, worst, "v--", color="C3", label=f"{label} worst image")
            if floor is not None:
                ax.axhline(floor, color="0.5", ls=":", lw=1, label="mean-colour floor")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if run is not None and run.history:
                acc = ax.twinx()
                acc.plot([e.step for e in run.history], [100 * e.test_accuracy for e in run.history], "s-",
                         color="0.45", lw=1, ms=3, label="test accuracy (%)")  # fmt: skip
                acc.set_ylabel("test acc. (%)", color="0.35")
                acc.set_ylim(0, 100)
                if i == 0 and j == 1:
                    h1, l1 = ax.get_legend_handles_labels()
                    h2, l2 = acc.get_legend_handles_labels()
                    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
            elif i == 0 and j == 1:
                ax.legend(fontsize=7, loc="best")
            if i == len(defenses) - 1:
                ax.set_xlabel("training step (optimizer steps)")
        cost = f"{fmt_bytes(run.bytes_per_step)}/worker/step" if run is not None else "run not found"
        axes[i][0].set_title(f"{group.shown(d)}: {cost}", fontsize=9, loc="left")
    title = f"Leakage along training: {group.dataset} / {group.model}"
    fig.suptitle(title)
    fig.tight_layout()
    path = out_dir / f"steps-{slug(group.dataset, group.model)}.png"
    _save(fig, path)
    caption = (
        "Per defense: SSIM (left) and PSNR (right) of the strongest attacker at each training step (mean over"
        " images, and the worst image), against the optimizer step the record was captured at; grey squares:"
        " the same run's test accuracy (right axis); the dotted line is the mean-colour floor; the title gives"
        " the run's bytes per worker per step. The oracle view (an upper bound) is left out."
        + (f" An infinite PSNR is drawn at {PSNR_PLOT_CAP:g} dB." if capped else "")
    )
    return Figure(path, "steps", title, caption, group.dataset, group.model)
