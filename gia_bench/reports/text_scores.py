"""The report's text numbers: per-sentence scores, the token-bag floor, and one verdict row per defense.

Text results (written by :mod:`gia_bench.evaluate` for a text data set: per-sentence scores
keyed ``rouge1``, ``rouge2``, ``rougeL``, ``token_f1``, ``exact``, ``pii``) never enter the
image tables; they get their own section built from this module.

**The floor.** Each original sentence's own token bag in random order: its non-padding token
ids shuffled by a generator seeded from the record id and the sentence index (so every
attack on a record faces the same floor), scored against the original with the same
metrics. It is what an attacker who knows exactly which tokens were used, and nothing about
their order, would score. Its ROUGE-1 is 1 by construction (the same bag), so ROUGE-1
cannot be beaten; a reconstruction *beats the floor* when its ROUGE-2 and its ROUGE-L both
exceed the floor's: it recovered word order (bigrams and the longest common subsequence)
beyond the bag. The token-bag attack (``tokens``) therefore reads "indistinguishable" by
design, while its token F1 beside the verdict says how much of the bag it found.

The verdict is :func:`gia_bench.reports.stats.floor_verdict` unchanged, fed (ROUGE-2,
ROUGE-L, floor ROUGE-2, floor ROUGE-L) in place of (SSIM, PSNR, floor SSIM, floor PSNR): the
same one-sided sign test, Bonferroni over the attacker settings a defense's strongest is
picked from, and the same three verdicts.

This module imports no attack or defense registry; the text metrics
(:mod:`gia_bench.text.metrics`, rouge-score) are imported only when a text result is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from gia_bench.reports import stats
from gia_bench.reports.load import AttackResult, RunSet, TrainRun
from gia_bench.results import Budget

#: the per-sentence metrics of a text result (gia_bench.text.metrics.KEYS), in table order
TEXT_KEYS = ("rouge1", "rouge2", "rougeL", "token_f1", "exact", "pii")
#: the metrics the floor is scored on and the verdict compares (ROUGE-1 of the floor is 1 by construction)
FLOOR_KEYS = ("rouge1", "rouge2", "rougeL")
TEXT_FILE = "reconstruction.txt"  # gia_bench.text.evaluate.TEXT_FILE, not imported: that module needs the extra

TEXT_FLOOR_RULE = (
    "Text verdict against the floor: the floor of a sentence is its own token bag (its non-padding token ids) in a"
    " random order (seeded by record and sentence), scored with the same metrics; its ROUGE-1 is 1 by construction."
    " A sentence beats the floor when its reconstruction's ROUGE-2 and ROUGE-L both exceed the floor's (word order"
    " recovered beyond the bag). The same one-sided sign test and Bonferroni level as for images decide leaks /"
    " indistinguishable / too few; a defense's strongest text attacker is the one with the lowest sign-test p, then"
    " the highest mean ROUGE-1 (the headline metric). A token-bag attack scores at most the floor: token F1 says how much of the bag"
    " it found."
)


def is_text_result(res: AttackResult) -> bool:
    """A result of a text data set: per-sentence text scores, or (no truth) a ``reconstruction.txt`` beside it."""
    if res.scores is not None:
        return any(im.value("token_f1") is not None or im.value("rouge1") is not None for im in res.scores.images)
    return res.path is not None and (res.folder / TEXT_FILE).is_file()


@dataclasses.dataclass(frozen=True)
class SentenceRow:
    """One original sentence of one record under one attack and view (a row of ``text.csv``)."""

    dataset: str
    model: str
    defense: str
    attack: str
    view: str
    step: int
    source: str
    record_id: str
    sentence: int
    matched: int
    tokens: int | None  # the original's non-padding tokens (None: originals not stored)
    scores: Mapping[str, float | None]  # TEXT_KEYS
    floor: Mapping[str, float] | None  # FLOOR_KEYS of the shuffled bag; None without the original
    bytes: int
    bytes_fp32: int
    batch_size: int
    seconds: float
    result: str

    @property
    def beats(self) -> bool | None:
        """ROUGE-2 and ROUGE-L both above the floor's; None without a floor."""
        if self.floor is None:
            return None
        r2, rl = self.scores.get("rouge2"), self.scores.get("rougeL")
        return r2 is not None and rl is not None and r2 > self.floor["rouge2"] and rl > self.floor["rougeL"]


def _read_ids(path: Path, batch_size: int) -> tuple[list[list[int]] | None, list[list[int]] | None]:
    """(original, reconstruction) non-padding token ids per sentence from ``reconstruction.safetensors``.

    The tensors are (B, 1, 3, T) rows of token ids, attention mask, PII field, stored as floats;
    anything else (a damaged or foreign file) gives None: the floor is then left out, never guessed.
    """
    if not path.is_file():
        return None, None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            names = set(fh.keys())
            tensors = {k: fh.get_tensor(k) for k in ("original", "reconstruction") if k in names}
    except (OSError, ValueError, RuntimeError, SafetensorError):  # a damaged file costs its floor, not the report
        return None, None

    def ids(name: str) -> list[list[int]] | None:
        t = tensors.get(name)
        if t is None or t.dim() != 4 or tuple(t.shape[1:3]) != (1, 3) or t.shape[0] != batch_size:
            return None
        if not bool(t.isfinite().all()):
            return None
        tok, mask = t[:, 0, 0].round().long(), t[:, 0, 1].round()
        return [row[m == 1].tolist() for row, m in zip(tok, mask)]

    return ids("original"), ids("reconstruction")


def floor_order(tokens: Sequence[int], record_id: str, sentence: int) -> list[int]:
    """The sentence's token bag in a random order, the same for every attack on that record and sentence."""
    import numpy as np

    seed = int.from_bytes(hashlib.sha256(f"{record_id}/{sentence}".encode()).digest()[:8], "little")
    order = np.random.default_rng(seed).permutation(len(tokens))
    return [int(tokens[i]) for i in order]


def floor_scores(tokens: Sequence[int], record_id: str, sentence: int) -> dict[str, float] | None:
    """ROUGE-1/2/L of the shuffled bag against the sentence; None when rouge-score is not installed."""
    import importlib.util

    if not tokens or importlib.util.find_spec("rouge_score") is None:
        return None
    from gia_bench.text.metrics import rouge

    return rouge(floor_order(tokens, record_id, sentence), list(tokens))


def sentence_rows(res: AttackResult) -> list[SentenceRow]:
    """The result's sentences, scored, each with its floor."""
    if res.scores is None:
        return []
    originals, _ = _read_ids(res.tensors_path, res.batch_size) if res.path is not None else (None, None)
    rows = []
    for im in res.scores.images:
        tokens = originals[im.index] if originals is not None and im.index < len(originals) else None
        rows.append(SentenceRow(
            dataset=res.dataset, model=res.model, defense=res.defense, attack=res.attack, view=res.view,
            step=res.step, source=res.source, record_id=res.record_id, sentence=im.index, matched=im.matched,
            tokens=None if tokens is None else len(tokens), scores={k: im.value(k) for k in TEXT_KEYS},
            floor=None if tokens is None else floor_scores(tokens, res.record_id, im.index),
            bytes=res.bytes, bytes_fp32=res.bytes_fp32, batch_size=res.batch_size, seconds=res.seconds,
            result=str(res.path),
        ))  # fmt: skip
    return rows


@dataclasses.dataclass(frozen=True)
class TextSetting:
    """One dataset x model x defense x attack x view x step over all its sentences."""

    dataset: str
    model: str
    defense: str
    attack: str
    view: str
    step: int
    source: str
    budget: Budget
    results: tuple[AttackResult, ...]
    sentences: tuple[SentenceRow, ...]
    threat: dict

    def mean(self, key: str) -> float | None:
        vals = [v for s in self.sentences if (v := s.scores.get(key)) is not None]
        return statistics.fmean(vals) if vals else None

    def worst(self, key: str) -> float | None:
        """The most leaking sentence (the highest value)."""
        vals = [v for s in self.sentences if (v := s.scores.get(key)) is not None]
        return max(vals) if vals else None

    def floor_mean(self, key: str) -> float | None:
        vals = [s.floor[key] for s in self.sentences if s.floor is not None]
        return statistics.fmean(vals) if vals else None

    def verdict(self, comparisons: int = 1) -> stats.Verdict:
        """The sign test on ROUGE-2 and ROUGE-L against the floor (sentences without a floor left out)."""
        pairs = [(s.scores.get("rouge2") or 0.0, s.scores.get("rougeL") or 0.0, s.floor["rouge2"], s.floor["rougeL"])
                 if s.floor is not None else (0.0, 0.0, None, None) for s in self.sentences]  # fmt: skip
        return stats.floor_verdict(pairs, comparisons=comparisons)

    @property
    def bytes_per_step(self) -> float:
        return statistics.fmean(r.bytes for r in self.results)

    @property
    def bytes_fp32(self) -> float:
        return statistics.fmean(r.bytes_fp32 for r in self.results)


@dataclasses.dataclass(frozen=True)
class TextDefenseRow:
    """One defense of one dataset x model: its cost, accuracy and strongest text attacker with a verdict."""

    dataset: str
    model: str
    defense: str
    name: str  # as tables show it
    bytes_per_step: float
    compression_ratio: float
    accuracy: stats.Estimate | None
    accuracy_model: str | None
    strongest: TextSetting | None
    attackers: int
    verdict: stats.Verdict | None

    @property
    def shown(self) -> str:
        return self.name or self.defense


@dataclasses.dataclass(frozen=True)
class TextGroup:
    """The text rows of one dataset x model: the headline rows and every setting."""

    dataset: str
    model: str
    rows: tuple[TextDefenseRow, ...]
    settings: tuple[TextSetting, ...]


def _strongest(settings: Sequence[TextSetting], verdicts: Mapping[int, stats.Verdict]) -> TextSetting | None:
    """Lowest sign-test p first (a setting leaks when ANY attacker beats the floor), then mean ROUGE-1, ROUGE-L."""
    if not settings:
        return None

    def key(i: int) -> tuple[float, float, float]:
        r1, rl = settings[i].mean("rouge1"), settings[i].mean("rougeL")
        return (-verdicts[i].p, -math.inf if r1 is None else r1, -math.inf if rl is None else rl)

    return settings[max(range(len(settings)), key=key)]


def _defense_row(dataset: str, model: str, defense: str, settings: list[TextSetting], trains: Sequence[TrainRun],
                 names: Mapping[str, str]) -> TextDefenseRow:  # fmt: skip
    from gia_bench.reports.tables import _accuracy_for, accuracy_of

    attackers = [s for s in settings if s.view != "oracle" and s.sentences]
    verdicts = {i: s.verdict(len(attackers)) for i, s in enumerate(attackers)}
    best = _strongest(attackers, verdicts)
    bytes_mean = statistics.fmean(s.bytes_per_step for s in settings)
    bytes32 = statistics.fmean(s.bytes_fp32 for s in settings)
    train = _accuracy_for(settings[0].results[0], trains)
    return TextDefenseRow(
        dataset=dataset, model=model, defense=defense, name=names.get(defense, defense), bytes_per_step=bytes_mean,
        compression_ratio=bytes32 / bytes_mean if bytes_mean > 0 else math.inf, accuracy=accuracy_of(train, trains),
        accuracy_model=None if train is None else train.model, strongest=best, attackers=len(attackers),
        verdict=None if best is None else verdicts[attackers.index(best)],
    )  # fmt: skip


def text_groups(runs: RunSet, names: Mapping[str, str] | None = None) -> tuple[TextGroup, ...]:
    """One :class:`TextGroup` per dataset x model of the text results; rows most bytes first."""
    names = names or {}
    by_setting: dict[tuple, list[tuple[AttackResult, list[SentenceRow]]]] = defaultdict(list)
    for res in runs.results:
        if is_text_result(res):
            key = (res.dataset, res.model, res.defense, res.attack, res.view, res.step, res.source)
            by_setting[key].append((res, sentence_rows(res)))
    by_group: dict[tuple[str, str], list[TextSetting]] = defaultdict(list)
    for key, items in sorted(by_setting.items()):
        results = tuple(r for r, _ in items)
        by_group[key[:2]].append(TextSetting(
            *key, budget=results[0].budget, results=results,
            sentences=tuple(s for _, rows in items for s in rows), threat=results[0].threat,
        ))  # fmt: skip
    groups = []
    for (dataset, model), settings in sorted(by_group.items()):
        by_defense: dict[str, list[TextSetting]] = defaultdict(list)
        for s in settings:
            by_defense[s.defense].append(s)
        rows = [_defense_row(dataset, model, d, ss, runs.trains, names) for d, ss in by_defense.items()]
        rows.sort(key=lambda r: (-r.bytes_per_step, r.defense))
        groups.append(TextGroup(dataset, model, tuple(rows), tuple(settings)))
    return tuple(groups)


def read_reconstruction_text(res: AttackResult, limit: int = 64) -> list[tuple[str, str]]:
    """(reconstruction, original) line pairs of the result's ``reconstruction.txt`` (at most ``limit`` sentences).

    The file is untrusted text: it is only split here; the writers escape it.
    """
    if res.path is None:
        return []
    try:
        text = (res.folder / TEXT_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    recs: dict[str, str] = {}
    pairs: list[tuple[str, str]] = []
    for line in text.splitlines()[: 2 * limit + 2]:
        head, sep, body = line.partition(":")
        if not sep or not head.startswith("#"):
            continue
        number, _, kind = head.partition(" ")
        if kind == "reconstruction":
            recs[number] = body.strip()
        elif kind == "original" and number in recs:
            pairs.append((recs.pop(number), body.strip()))
    pairs += [(r, "") for r in recs.values()]  # no truth: reconstructions alone
    return pairs[:limit]
