"""The LQ-SGD paper's claims (arXiv 2506.17974), checked on a study's own runs.

The paper makes three claims a user of this toolkit wants to check first:

1. LQ-SGD at rank 1, 8 bits sends about 75 % fewer bytes than PowerSGD at rank 1, at an
   accuracy within 2-3 points of uncompressed SGD (``none``);
2. over a rank sweep, LQ-SGD keeps PowerSGD's accuracy at a fraction of its bytes;
3. under gradient inversion, LQ-SGD's reconstructions are less similar to the originals
   (lower SSIM) than SGD's and the baselines'.

:func:`write_claims` reads the training runs (every seed of every defense, each run's
per-epoch test accuracy and bytes from its ``metrics.json``) and the attack results, and
writes ``claims.md`` (a claim / measured / verdict table, then the convergence table: the
epochs each setting needs to come within 1 point of SGD's final accuracy) and two figures,
accuracy against epoch and against bytes sent, with standard errors over seeds. It writes
nothing when the runs hold no ``none`` training run beside a PowerSGD or LQ-SGD one.

Standard errors are over seeds (training) or records (attacks); "within noise" means the
difference is inside two standard errors. SSIM is per record the strongest attack and view
(the highest SSIM any attacker reached: the defense protects only what no attacker recovers).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from gia_bench.errors import SpecError
from gia_bench.registry import parse_spec
from gia_bench.reports.figures import Figure, _log_x, _pyplot, _save
from gia_bench.reports.io import write_text
from gia_bench.reports.load import AttackResult, RunSet, TrainRun
from gia_bench.reports.text_scores import is_text_result

#: The claims' thresholds, as the paper states them (accuracy in points, bytes as a fraction).
CLAIM_BYTES_SAVED = 0.70  # "about 75 % fewer bytes": 70 % or more counts
CLAIM_ACC_GAP = 3.0  # "within 2-3 points of SGD"
SWEEP_ACC_GAP = 1.0  # rank sweep: LQ-SGD within 1 point of PowerSGD at the same rank
CONVERGED_WITHIN = 1.0  # convergence: epochs to come within 1 point of SGD's final accuracy
#: The smallest SSIM difference that counts as lower: 0.9999 against 1.0000 is the same image.
SSIM_MATTERS = 0.01


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


@dataclasses.dataclass(frozen=True)
class Setting:
    """A defense as the claims name it: family (``none``, ``powersgd``, ``lqsgd``...) and rank."""

    family: str
    rank: int | None

    @classmethod
    def of(cls, spec: str) -> Setting:
        try:
            parsed = parse_spec(spec)
        except SpecError:
            return cls(spec, None)
        rank = parsed.kwargs.get("rank")
        return cls(parsed.name, int(rank) if rank is not None and str(rank).isdigit() else None)

    @property
    def label(self) -> str:
        return {"none": "SGD (none)", "powersgd": "PowerSGD", "lqsgd": "LQ-SGD"}.get(self.family, self.family) + (
            f" r{self.rank}" if self.rank is not None else "")


@dataclasses.dataclass(frozen=True)
class Curve:
    """One defense's training runs over seeds: accuracy (%) and cumulative bytes per worker per epoch."""

    defense: str
    seeds: int
    accuracy: tuple[tuple[float, float], ...]  # (mean, se) after each epoch, in %
    bytes_sent: tuple[float, ...]  # mean cumulative bytes per worker after each epoch

    @property
    def final(self) -> tuple[float, float]:
        return self.accuracy[-1]

    @property
    def total_bytes(self) -> float:
        return self.bytes_sent[-1]

    def epochs_to(self, target: float) -> int | None:
        """The first epoch (1-based) whose mean accuracy reaches ``target`` %; None if none does."""
        return next((i + 1 for i, (m, _) in enumerate(self.accuracy) if m >= target), None)


def curves(trains: Sequence[TrainRun]) -> dict[str, Curve]:
    """Per defense spec, the runs' histories averaged over seeds (epochs every run reached)."""
    by_defense: dict[str, list[TrainRun]] = defaultdict(list)
    for t in trains:
        if t.history:
            by_defense[t.defense].append(t)
    out = {}
    for defense, runs in by_defense.items():
        epochs = min(len(t.history) for t in runs)
        acc = tuple(_mean_se([100 * t.history[e].test_accuracy for t in runs]) for e in range(epochs))
        cum = [[sum(p.bytes_sent_per_worker for p in t.history[: e + 1]) for e in range(epochs)] for t in runs]
        sent = tuple(statistics.fmean(c[e] for c in cum) for e in range(epochs))
        out[defense] = Curve(defense, len(runs), acc, sent)
    return out


def _setup(trains: Sequence[TrainRun]) -> list[TrainRun]:
    """The training runs of the (dataset, model) with the most runs: the claims compare like with like."""
    groups: dict[tuple[str, str], list[TrainRun]] = defaultdict(list)
    for t in trains:
        groups[(t.dataset, t.model)].append(t)
    return max(groups.values(), key=len) if groups else []


@dataclasses.dataclass(frozen=True)
class Claim:
    """One row of the table."""

    claim: str
    measured: str
    verdict: str


def _find(cs: dict[str, Curve], family: str, rank: int | None = None) -> Curve | None:
    for spec, c in sorted(cs.items()):
        s = Setting.of(spec)
        if s.family == family and (rank is None or s.rank == rank):
            return c
    return None


def _pts(m: float, se: float) -> str:
    return f"{m:+.1f} ± {se:.1f} pts" if se else f"{m:+.1f} pts"


def claim_bytes_accuracy(cs: dict[str, Curve]) -> Claim | None:
    """Claim 1: LQ-SGD r1 vs PowerSGD r1 (bytes) and vs SGD (accuracy)."""
    sgd, ps, lq = _find(cs, "none"), _find(cs, "powersgd", 1), _find(cs, "lqsgd", 1)
    if sgd is None or ps is None or lq is None:
        return None
    saved = 1 - lq.total_bytes / ps.total_bytes if ps.total_bytes else math.nan
    gap = sgd.final[0] - lq.final[0]
    se = math.hypot(sgd.final[1], lq.final[1])
    bytes_ok = saved >= CLAIM_BYTES_SAVED
    if gap <= CLAIM_ACC_GAP:
        acc = "holds"
    elif gap - 2 * se <= CLAIM_ACC_GAP:
        acc = "holds within noise"
    else:
        acc = "does not hold"
    verdict = ("holds" if bytes_ok and acc == "holds" else
               f"bytes {'hold' if bytes_ok else 'do not hold'}; accuracy {acc}")
    measured = (f"{100 * saved:.1f} % fewer bytes than PowerSGD r1; accuracy {lq.final[0]:.1f} % vs SGD"
                f" {sgd.final[0]:.1f} % ({_pts(-gap, se)}, {lq.seeds} seed{'s' if lq.seeds > 1 else ''})")
    return Claim("LQ-SGD r1, 8 bits: ~75 % fewer bytes than PowerSGD r1, accuracy within 2-3 points of SGD",
                 measured, verdict)


def claim_rank_sweep(cs: dict[str, Curve]) -> Claim | None:
    """Claim 2: at every rank both ran, LQ-SGD's bytes below PowerSGD's, accuracy within 1 point."""
    ranks = sorted({s.rank for s in map(Setting.of, cs) if s.family == "lqsgd" and s.rank is not None
                    and _find(cs, "powersgd", s.rank) is not None})
    if len(ranks) < 2:
        return None
    parts, states = [], []
    for r in ranks:
        lq, ps = _find(cs, "lqsgd", r), _find(cs, "powersgd", r)
        if lq is None or ps is None:
            continue
        diff, se = lq.final[0] - ps.final[0], math.hypot(lq.final[1], ps.final[1])
        ratio = lq.total_bytes / ps.total_bytes if ps.total_bytes else math.nan
        parts.append(f"r{r}: {ratio:.2f}x bytes, {_pts(diff, se)}")
        if not ratio < 1 or diff + 2 * se < -SWEEP_ACC_GAP:
            states.append("no")
        else:
            states.append("yes" if diff >= -SWEEP_ACC_GAP else "noise")
    verdict = "does not hold" if "no" in states else "holds within noise" if "noise" in states else "holds"
    return Claim(f"Rank sweep {{{', '.join(map(str, ranks))}}}: LQ-SGD within 1 point of PowerSGD's accuracy"
                 " at fewer bytes, at every rank", "; ".join(parts), verdict)


def _ssim_by_record(results: Sequence[AttackResult]) -> dict[str, dict[str, tuple[float, str]]]:
    """defense -> record id -> (the highest mean SSIM any attack and view reached, that attack/view)."""
    best: dict[str, dict[str, tuple[float, str]]] = defaultdict(dict)
    for r in results:
        if r.scores is None or not r.scores.images or r.source != "capture":
            continue
        ssim = statistics.fmean(im.ssim for im in r.scores.images)
        prev = best[r.defense].get(r.record_id)
        if prev is None or ssim > prev[0]:
            best[r.defense][r.record_id] = (ssim, f"{r.attack.split(':')[0]}/{r.view}")
    return best


def claim_inversion(results: Sequence[AttackResult]) -> Claim | None:
    """Claim 3: LQ-SGD's SSIM (strongest attack per record) below SGD's and every other defense's, paired by record."""
    best = _ssim_by_record(results)
    lq = next((d for d in sorted(best) if Setting.of(d).family == "lqsgd"), None)
    others = [d for d in sorted(best) if Setting.of(d).family != "lqsgd"]
    if lq is None or not others:
        return None
    parts, verdicts = [f"LQ-SGD {statistics.fmean(v for v, _ in best[lq].values()):.3f}"], []
    for d in others:
        shared = sorted(set(best[d]) & set(best[lq]))
        if not shared:
            continue
        diffs = [best[d][k][0] - best[lq][k][0] for k in shared]
        m, se = _mean_se(diffs)
        parts.append(f"{Setting.of(d).label} {statistics.fmean(best[d][k][0] for k in shared):.3f}"
                     f" (LQ-SGD lower by {m:+.3f} ± {se:.3f}, {len(shared)} records)")
        if m > max(2 * se, SSIM_MATTERS):
            verdicts.append("holds")
        else:  # lower by less than noise or than SSIM_MATTERS: as recoverable; higher beyond noise: no
            verdicts.append("no" if m + 2 * se < 0 or (m <= SSIM_MATTERS and se < SSIM_MATTERS) else "within noise")
    verdict = ("holds" if all(v == "holds" for v in verdicts) else "does not hold" if "no" in verdicts
               else "within noise")
    attackers = sorted({how for _, how in best[lq].values()})
    measured = "mean SSIM, strongest attack per record: " + "; ".join(parts) + (
        f" (LQ-SGD's strongest: {', '.join(attackers)})")
    return Claim("Under gradient inversion, LQ-SGD's SSIM is lower than SGD's and the baselines'", measured, verdict)


def convergence_rows(cs: dict[str, Curve]) -> list[tuple[str, str, str, str, str]]:
    """(setting, seeds, final accuracy, MB sent per worker, epochs to within 1 point of SGD's final accuracy)."""
    sgd = _find(cs, "none")
    target = sgd.final[0] - CONVERGED_WITHIN if sgd is not None else None
    rows = []
    for spec, c in sorted(cs.items(), key=lambda kv: (-kv[1].total_bytes, kv[0])):
        reached = c.epochs_to(target) if target is not None else None
        when = "-" if target is None else (str(reached) if reached else f"not in {len(c.accuracy)}")
        m, se = c.final
        acc = f"{m:.1f} ± {se:.1f}" if c.seeds > 1 else f"{m:.1f}"  # one seed: no standard error
        rows.append((Setting.of(spec).label, str(c.seeds), acc, f"{c.total_bytes / 1e6:.2f}", when))
    return rows


def _plot(cs: dict[str, Curve], out_dir: Path, by_bytes: bool) -> Figure:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("tab10")
    ranks = sorted({s.rank for s in map(Setting.of, cs) if s.rank is not None})
    for spec, c in sorted(cs.items(), key=lambda kv: -kv[1].total_bytes):
        s = Setting.of(spec)
        xs = list(c.bytes_sent) if by_bytes else list(range(1, len(c.accuracy) + 1))
        color = "black" if s.family == "none" else cmap(ranks.index(s.rank) % 10) if s.rank in ranks else "0.5"
        ax.errorbar(xs, [m for m, _ in c.accuracy], yerr=[se for _, se in c.accuracy], label=s.label, color=color,
                    ls="--" if s.family == "powersgd" else "-", marker="o" if s.family == "lqsgd" else "s",
                    ms=3, capsize=2, lw=1.2)
    if by_bytes:
        _log_x(ax, [b for c in cs.values() for b in c.bytes_sent])
        ax.set_xlabel("bytes sent per worker (cumulative)")
    else:
        ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    title = f"Accuracy vs {'bytes sent' if by_bytes else 'epoch'}"
    fig.suptitle(title)
    path = out_dir / f"claims-accuracy-vs-{'bytes' if by_bytes else 'epoch'}.png"
    _save(fig, path)
    return Figure(path, "accuracy", title, "Mean test accuracy over seeds after each epoch, bars one standard error;"
                  " dashed: PowerSGD, solid: LQ-SGD, one colour per rank, black: SGD.")


def claims_markdown(claims: Sequence[Claim], rows: Sequence[tuple[str, ...]], figures: Sequence[Figure],
                    out: Path) -> str:
    lines = ["# The LQ-SGD paper's claims, measured", "",
             "| the paper's claim | gia-bench measured | verdict |", "|---|---|---|"]
    lines += [f"| {c.claim} | {c.measured} | {c.verdict} |" for c in claims]
    lines += ["", "## Convergence", "",
              f"Epochs each setting needs to come within {CONVERGED_WITHIN:g} point of SGD's final accuracy"
              " (mean over seeds; ± one standard error).", "",
              "| setting | seeds | final accuracy (%) | MB sent per worker | epochs to within 1 point of SGD |",
              "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    for f in figures:
        lines += ["", f"![{f.title}]({f.path.relative_to(out).as_posix()})", "", f.caption]
    return "\n".join(lines) + "\n"


def write_claims(runs: RunSet, out: Path) -> list[Path]:
    """``claims.md`` and its two figures in ``out``; nothing (an empty list) without SGD beside PowerSGD/LQ-SGD."""
    cs = curves(_setup(runs.trains))
    families = {Setting.of(d).family for d in cs}
    if "none" not in families or not families & {"powersgd", "lqsgd"}:
        return []
    images = [r for r in runs.results if not is_text_result(r)]  # the inversion claim is about images (SSIM)
    claims = [c for c in (claim_bytes_accuracy(cs), claim_rank_sweep(cs), claim_inversion(images)) if c]
    out = Path(out)
    figures = [_plot(cs, out / "figures", by_bytes=False), _plot(cs, out / "figures", by_bytes=True)]
    md = write_text(out / "claims.md", claims_markdown(claims, convergence_rows(cs), figures, out))
    return [md] + [f.path for f in figures]
