"""Run attacks on saved records, then (and only then) score them against the truth.

This is the evaluation side of the threat model in DESIGN.md: an attack
(:mod:`gia_bench.attacks`) turns a record into a reconstruction from the record
alone; this module runs it, opens the truth file beside the record only after the
attack has returned, scores the reconstruction (:func:`gia_bench.metrics.score_batch`,
Hungarian pairing) and writes the result. ``gia-bench attack`` is one call of
:func:`run_attacks`; a study calls :func:`run_attack` per unit.

Layout, for each record and each (attack, view)::

    OUT/<defense>/<record-id>/<attack-dir>/result.json              (written last, atomically)
    OUT/<defense>/<record-id>/<attack-dir>/reconstruction.png       reconstructions (top row), originals under them
    OUT/<defense>/<record-id>/<attack-dir>/reconstruction.safetensors   "reconstruction" (B,C,H,W in [0,1]), "original"

``<defense>`` is the slug of the record's compressor: its registry name plus
``_key-value`` for every parameter that differs from the default (``none``,
``topk_ratio-0.05``), so two defenses never share a folder. ``<attack-dir>`` is
``<slug>-<view>`` (``dlg-naive``, ``ig_iterations-2000-aware``; see
:attr:`Attack.slug`), with ``-s<seed>`` appended for a seed other than 0.

A result is identified by its content, not its folder (:mod:`gia_bench.identity`):
(sha256 of the record file, the attack's canonical spec with every default, the view,
the seed, the result schema). What an existing result.json in the folder gets:

- reused (and reported as reused): its identity is the wanted one, its ``record_id``
  and ``defense`` are the record's, and the record file it names, where that file
  exists, hashes to the sha256 it claims (a moved record folder keeps its results);
- recomputed, replacing it atomically: it was computed from an older version of this
  record file, its claim does not verify (the file it names hashes to another sha256:
  a stale or forged result), or it is of another spec, seed or schema;
- an error naming both files, never reused nor overwritten: it belongs to a
  *different* record file with the same id and defense (one that verifies, or one no
  longer there to check).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from gia_bench.attack_skips import clear_skip, write_skip
from gia_bench.attacks.base import Attack, NotApplicable, Progress, Reconstruction, create
from gia_bench.attacks.views import RESIDUAL
from gia_bench.budget import DEFAULT_MAX_MEMORY, check_attack
from gia_bench.errors import GiaBenchError, RecordError
from gia_bench.events import SILENT, Events, Silent
from gia_bench.identity import (ResultConflictError, ResultIdentity, file_sha256, identity_of, named_record,
                                named_record_sha256, result_identity, same_file)  # fmt: skip
from gia_bench.io import atomic_write_bytes, slug
from gia_bench.receiver import load_record
from gia_bench.records import GradientRecord, Truth, find_record_files, truth_path
from gia_bench.specs import DatasetSpec
from gia_bench.results import GRID_FILE, RESULT_FILE, TENSORS_FILE, AttackResult, MalformedFile, Skipped
from gia_bench.text.data import is_text
from gia_bench.threat import VIEWS

if TYPE_CHECKING:
    from gia_bench.metrics import BatchScores

LPIPS_NETS = ("alex", "vgg")


def check_lpips_net(lpips_net: str, flag: str = "--lpips-net") -> str:
    """``lpips_net`` if it is a known LPIPS trunk, else a one-line error naming the flag."""
    if lpips_net not in LPIPS_NETS:
        raise GiaBenchError(f"{flag} {lpips_net!r}: accepted values are {', '.join(LPIPS_NETS)}")
    return lpips_net


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GiaBenchError(f"--device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GiaBenchError(f"--device {device!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise GiaBenchError(f"--device {device!r}: only cpu and cuda are supported")
    return dev


# -- where results go ----------------------------------------------------------------------------


def _safe_name(text: str, limit: int = 120) -> str:
    return slug(text, strip=".", default="record", limit=limit)


def defense_slug(spec: str) -> str:
    """A folder name for a defense spec: the registry name plus ``_key-value`` per non-default parameter.

    ``none`` -> ``none``; ``topk:ratio=0.05`` and its canonical spec (every parameter
    spelled out) -> the same ``topk_ratio-0.05``. A spec that does not resolve here
    (an untrusted plug-in) is slugged as written.
    """
    from gia_bench.defenses import DEFENSES
    from gia_bench.registry import describe_params, parse_spec

    try:
        parsed = parse_spec(spec)
        cls, kwargs = DEFENSES.kwargs_for(parsed)
        defaults = {p.name: p.default for p in describe_params(cls)}
    except GiaBenchError:
        return _safe_name(spec.replace(":", "_").replace(",", "_").replace("=", "-"))
    parts = [parsed.name.replace(":", "_")]
    for key, value in kwargs.items():
        if key in defaults and value == defaults[key]:
            continue
        parts.append(f"{key}-{str(value).lower() if isinstance(value, bool) else value}")
    return _safe_name("_".join(parts))


def attack_dirname(attack: Attack, view: str, seed: int = 0) -> str:
    """``<slug>-<view>``, e.g. ``dlg-naive`` or ``ig_iterations-2000-aware``; ``-s<seed>`` for seed != 0."""
    return f"{attack.slug}-{view}" + (f"-s{seed}" if seed else "")


def result_dir(out_root: Path, record_id: str, attack: Attack, view: str, defense: str, seed: int = 0) -> Path:
    """Where :func:`run_attack` writes the result of ``attack`` in ``view`` on record ``record_id``."""
    return Path(out_root) / defense_slug(defense) / _safe_name(record_id) / attack_dirname(attack, view, seed)


# -- pictures ------------------------------------------------------------------------------------


def _tile(images01: torch.Tensor, scale: int) -> np.ndarray:
    """(B, C, H, W) in [0, 1] -> one uint8 row of tiles, 2 px gaps, each upscaled by ``scale``."""
    b, c, h, w = images01.shape
    gap = 2
    row = np.full((h * scale, b * (w * scale + gap) - gap, 3), 255, dtype=np.uint8)
    for i in range(b):
        img = images01[i].detach().cpu().float()
        img = img.expand(3, h, w) if c == 1 else img[:3]
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
        x0 = i * (w * scale + gap)
        row[:, x0 : x0 + w * scale] = arr
    return row


def save_grid(path: Path, reconstruction01: torch.Tensor, original01: torch.Tensor | None) -> None:
    """Reconstructions in the top row, the originals (when known) under them, as a PNG."""
    import io

    h = reconstruction01.shape[-2]
    scale = max(1, math.ceil(64 / h))
    rows = [_tile(reconstruction01, scale)]
    if original01 is not None:
        rows += [np.full((4, rows[0].shape[1], 3), 255, dtype=np.uint8), _tile(original01, scale)]
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


# -- one attack ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttackOutcome:
    """One finished (record, attack, view): its result, where its result.json is, whether it was reused."""

    path: Path  # the result.json
    record: Path
    view: str
    reused: bool
    result: AttackResult

    @property
    def record_id(self) -> str:
        return self.result.record_id

    @property
    def attack(self) -> str:
        return self.result.attack

    @property
    def defense(self) -> str:
        return self.result.defense

    def mean(self, metric: str) -> float | None:
        """Mean of a registered per-image metric over the batch, or None if unscored."""
        return self.result.mean(metric)


def _existing(result_path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(result_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: not a result we could reuse, recompute it
    return data if isinstance(data, dict) else {}


def _reusable(existing: dict[str, Any], wanted: ResultIdentity, record_path: Path, record_sha256: str) -> bool:
    """Is ``existing`` the result ``wanted`` asks for, and does the record it names back its claim?

    Its identity must be the wanted one, and the record file it names must be
    ``record_path`` itself or, where it is another file that exists, hash to the sha256
    the result claims: a result naming a record whose content is not what it says is not
    reused. A named file that is gone leaves the content key alone to decide.
    """
    if identity_of(existing) != wanted:
        return False
    named = named_record(existing)
    if named is None or same_file(named, record_path):
        return True
    actual = named_record_sha256(existing)
    return actual is None or actual == existing.get("record_sha256") == record_sha256


def _check_reuse(existing: dict[str, Any], wanted: ResultIdentity, result_path: Path, record_path: Path,
                 record: GradientRecord) -> bool:
    """True: reuse ``existing``; False: recompute (replacing it); raises when it is another record's result."""
    assert record.sha256 is not None  # load_record always hashes the file it read
    if (
        _reusable(existing, wanted, record_path, record.sha256)
        and existing.get("record_id") == record.record_id
        and existing.get("defense") == record.meta.defense
    ):
        return True
    claimed = existing.get("record_sha256")
    named = named_record(existing)
    if claimed == record.sha256 or (named is not None and same_file(named, record_path)):
        return False  # this record's result, of another spec/seed/schema, or this file changed since
    actual = named_record_sha256(existing)
    if actual is not None and actual != claimed:
        return False  # its claim does not verify: a stale or forged result, not another record's
    raise ResultConflictError(
        f"{result_path}: holds the result of record {existing.get('record')!r}"
        f" (sha256 {str(claimed)[:12]}), not of {record_path} (sha256 {record.sha256[:12]}), which has the"
        " same id and defense; use another --out"
    )


def result_is_current(result_path: Path, record_path: Path, attack_spec: str, view: str, seed: int) -> bool:
    """Is ``result_path`` the result of ``attack_spec`` in ``view`` with ``seed`` on the record file now at ``record_path``?

    What a study's resume asks of each attack unit: a result.json that exists is not
    enough; its identity must match the record's current content (a record replaced
    since is attacked again) and the record it names must back its claim (as in
    :func:`evaluate`). Cheap: the record is hashed (once per file and version), not loaded.
    """
    existing = _existing(Path(result_path))
    if not existing:
        return False
    try:
        sha = file_sha256(Path(record_path))
    except OSError:
        return False
    wanted = result_identity(sha, attack_spec, view, seed)
    return _reusable(existing, wanted, Path(record_path), sha)


def _reuse(result_path: Path, record_path: Path, record: GradientRecord, attack: Attack, view: str,
           seed: int) -> AttackResult | None:
    """The result already at ``result_path`` when it is the wanted one (:func:`_check_reuse`), else None."""
    existing = _existing(result_path)
    if not existing or not _check_reuse(existing, result_identity(record.sha256, attack.spec, view, seed),
                                        result_path, record_path, record):  # fmt: skip
        return None
    try:
        return AttackResult.from_json(existing, result_path)
    except MalformedFile:
        return None  # its identity is right but the rest is damaged: recompute it


def _run(attack: Attack, record: GradientRecord, view: str, seed: int, progress: Progress | None,
         dev: torch.device) -> tuple[Reconstruction, float]:
    """The attack's reconstruction with ``seed``, and the seconds it took."""
    generator = torch.Generator(device=dev)
    generator.manual_seed(seed)
    start = time.perf_counter()
    rec = attack.run(record, view, generator, progress, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return rec, time.perf_counter() - start


def _truth(record_path: Path, record: GradientRecord) -> Truth | None:
    """The truth file beside the record, if there is one: read only after the attack has returned."""
    tpath = truth_path(record_path)
    if not tpath.exists():
        return None
    truth = Truth.load(tpath)
    if truth.inputs.shape[0] != record.meta.batch_size:
        raise RecordError(
            f"{tpath}: holds {truth.inputs.shape[0]} examples, its record {record_path} a batch of"
            f" {record.meta.batch_size}"
        )
    return truth


@dataclasses.dataclass(frozen=True)
class _Scored:
    """The reconstruction in [0, 1] and its labels in the originals' order, and their scores."""

    reconstruction01: torch.Tensor
    labels: torch.Tensor
    original01: torch.Tensor | None = None
    scores: BatchScores | None = None


def _score(record: GradientRecord, rec: Reconstruction, truth: Truth | None, lpips_net: str,
           lpips_weights: Path | None) -> _Scored:
    """Pair and score the reconstruction against ``truth`` (:func:`gia_bench.metrics.score_batch`)."""
    spec = record.meta.dataset
    if is_text(spec):  # token ids: text metrics, never clamped as pixels (gia_bench.text.evaluate)
        if truth is None:
            return _Scored(rec.inputs, rec.labels)
        from gia_bench.text.evaluate import text_batch_scores

        text = text_batch_scores(rec.inputs, rec.labels, truth.inputs, truth.labels)
        order = list(text.matching)
        return _Scored(rec.inputs[order], rec.labels[order], truth.inputs.to(torch.float32), text)
    rec01 = spec.denormalize(rec.inputs).clamp(0, 1)
    if truth is None:
        return _Scored(rec01, rec.labels)
    from gia_bench.metrics import get_lpips, score_batch  # lazy: importing evaluate stays light

    orig01 = spec.denormalize(truth.inputs.to(torch.float32)).clamp(0, 1)
    scores = score_batch(rec01, orig01, rec.labels, truth.labels, lpips=get_lpips(lpips_net, lpips_weights))
    order = list(scores.matching)
    return _Scored(rec01[order], rec.labels[order], orig01, scores)


def _threat(rec: Reconstruction, view: str) -> dict[str, Any]:
    """What the attacker knew and used, as result.json records it."""
    return {
        "model": "white-box",
        "batch_size_known": True,
        "labels": f"inferred ({rec.label_strategy})",
        "compressor_known": view in ("aware", "oracle"),
        "public_state_used": list(rec.public_state_used),
        "observed": rec.observed,
        **({"update": rec.update} if rec.update else {}),
        "residual": RESIDUAL.get(view, "not modelled"),
        "upper_bound": view == "oracle",
    }


@dataclasses.dataclass(frozen=True)
class _Run:
    """One attack run, before it is written: what :func:`_result` needs beyond the record."""

    attack: Attack
    view: str
    seed: int
    device: torch.device
    rec: Reconstruction
    seconds: float


def _shown(attack: str, defense: str) -> dict[str, str]:
    """How reports show the specs: parameters at their defaults left out (reports import no registry)."""
    from gia_bench.attacks import ATTACKS
    from gia_bench.defenses import DEFENSES
    from gia_bench.registry import display_spec

    return {"attack": display_spec(attack, ATTACKS), "defense": display_spec(defense, DEFENSES)}


def _result(record: GradientRecord, record_path: Path, run: _Run, truth: Truth | None,
            scored: _Scored) -> AttackResult:
    """The :class:`~gia_bench.results.AttackResult` of one run, with the published budget beside its own."""
    rec, meta = run.rec, record.meta
    budget = dataclasses.replace(rec.budget or run.attack.budget, published=run.attack.published_budget,
                                 published_known=True)  # fmt: skip
    return AttackResult(
        path=None, record_id=record.record_id, record=str(record_path), record_sha256=record.sha256,
        dataset=meta.dataset.name, model=meta.model.spec, defense=meta.defense, attack=run.attack.spec,
        view=run.view, threat=_threat(rec, run.view), step=meta.step, source=meta.extra.get("source", "capture"),
        bytes=meta.bytes_sent, bytes_fp32=sum(int(s.numel()) * 4 for s in record.param_shapes),
        batch_size=meta.batch_size, labels_inferred=tuple(int(v) for v in scored.labels),
        labels_true=None if truth is None else tuple(int(v) for v in truth.labels),
        seconds=run.seconds, iterations=rec.iterations, final_loss=rec.final_loss, scores=scored.scores,
        budget=budget, seed=run.seed, device=str(run.device), extra=rec.extra,
        shown=_shown(run.attack.spec, meta.defense),
    )  # fmt: skip


def _write(out_dir: Path, result: AttackResult, scored: _Scored, spec: DatasetSpec) -> AttackResult:
    """The reconstruction files, then result.json last (atomically); returns the result as written."""
    from safetensors.torch import save

    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / RESULT_FILE
    # a result not reused (stale, forged, another spec) goes before the new files land: the
    # folder never pairs it with the new reconstruction; the new result.json comes last
    result_path.unlink(missing_ok=True)
    tensors = {"reconstruction": scored.reconstruction01.contiguous()}
    if scored.original01 is not None:
        tensors["original"] = scored.original01.contiguous()
    atomic_write_bytes(out_dir / TENSORS_FILE, save(tensors))
    if is_text(spec):
        from gia_bench.text.evaluate import TEXT_FILE, save_text

        save_text(out_dir / TEXT_FILE, scored.reconstruction01, scored.original01, spec)
    else:
        save_grid(out_dir / GRID_FILE, scored.reconstruction01, scored.original01)
    result.write(result_path)
    clear_skip(out_dir)
    return AttackResult.read(result_path)  # what every reader sees (tuples in ``extra`` are lists there)


def evaluate(
    record_path: Path,
    attack_spec: str,
    view: str,
    out_root: Path,
    seed: int = 0,
    device: str = "cpu",
    lpips_net: str = "alex",
    lpips_weights: Path | None = None,
    progress: Progress | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> AttackOutcome:
    """Attack the record at ``record_path``, score it if a truth file is beside it, write the result.

    A result with the same identity (record content, canonical attack spec, view,
    seed, schema) is reused, not recomputed (``reused=True``). An attack whose estimated
    memory exceeds ``max_memory`` bytes is refused before it allocates (:mod:`gia_bench.budget`).
    """
    record_path = Path(record_path)
    attack = create(attack_spec)
    attack.check_view(view)
    dev = resolve_device(device)
    record = load_record(record_path)
    out_dir = result_dir(out_root, record.record_id, attack, view, record.meta.defense, seed)
    reused = _reuse(out_dir / RESULT_FILE, record_path, record, attack, view, seed)
    if reused is not None:
        return AttackOutcome(out_dir / RESULT_FILE, record_path, view, True, reused)
    check_attack(record.meta, attack, max_memory, record_path)  # before the attack allocates anything

    if view == "oracle":
        # the evaluation side, not the attack, reads the worker's private residual: an upper bound
        tpath = truth_path(record_path)
        if not tpath.exists():
            raise GiaBenchError(f"--view oracle: {record_path} has no truth file {tpath.name} to read the residual from")
        record = record.with_private(Truth.load(tpath))

    try:
        rec, seconds = _run(attack, record, view, seed, progress, dev)
    except NotApplicable as exc:  # a refusal with its reason, kept where the result would be
        write_skip(out_dir, record_path, file_sha256(record_path), attack_spec, view, seed, str(exc))
        raise
    # The attack has returned: only now may the truth be read, to score.
    truth = _truth(record_path, record)
    scored = _score(record, rec, truth, lpips_net, lpips_weights)
    result = _result(record, record_path, _Run(attack, view, seed, dev, rec, seconds), truth, scored)
    result = _write(out_dir, result, scored, record.meta.dataset)
    return AttackOutcome(out_dir / RESULT_FILE, record_path, view, False, result)


def run_attack(
    record_path: Path,
    attack_spec: str,
    view: str,
    out_root: Path,
    seed: int = 0,
    device: str = "cpu",
    lpips_net: str = "alex",
    lpips_weights: Path | None = None,
    events: Events = SILENT,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> Path:
    """:func:`evaluate`, returning the path of ``result.json`` (kept for scripts that want only the file).

    ``events`` hears it as :func:`run_attacks` tells each of its attacks: ``on_start(1, "attack")``,
    ``on_step(0, label, {"iteration", "iterations", "loss"})`` as it iterates, ``on_result``, ``on_step(1)``.
    """
    label = f"{Path(record_path).name} {attack_spec.split(':')[0]}-{view}"
    events.on_start(1, "attack", label)

    def progress(i: int, total: int, loss: float) -> None:
        events.on_step(0, label, {"iteration": i, "iterations": total, "loss": loss})

    result = evaluate(
        record_path, attack_spec, view, out_root, seed, device, lpips_net, lpips_weights,
        None if type(events) is Silent else progress, max_memory,
    )
    events.on_result(label, result_line(result))
    events.on_step(1, label)
    return result.path


# -- the records x attacks x views grid (``gia-bench attack``) ------------------------------------


@dataclasses.dataclass(frozen=True)
class AttackOptions:
    """How ``gia-bench attack`` runs (its flags)."""

    out: Path = Path("runs")
    seed: int = 0
    device: str = "cpu"
    lpips_net: str = "alex"
    lpips_weights: Path | None = None
    plugins: tuple[str, ...] = ()  # module:Class names the user trusts (--plugin)
    max_memory: int = DEFAULT_MAX_MEMORY  # bytes an attack may use (--max-memory; gia_bench.budget)


def result_line(r: AttackOutcome) -> str:
    """One plain line per result: ``rec-0 [topk] dlg (naive): 30 it, 1.2 s, PSNR ... -> path``."""
    psnr, ssim, acc = r.mean("psnr"), r.mean("ssim"), r.result.label_accuracy
    scored = "" if psnr is None else f", PSNR {psnr:.2f} dB, SSIM {ssim:.3f}, label accuracy {acc:.2f}"
    if r.mean("token_f1") is not None:  # a text result (gia_bench.text): its own metrics
        scored = (f", token F1 {r.mean('token_f1'):.3f}, ROUGE-1 {r.mean('rouge1'):.3f},"
                  f" exact {r.mean('exact'):.2f}, label accuracy {acc:.2f}")
    return (f"{'reused ' if r.reused else ''}{r.record_id} [{r.defense.split(':')[0]}] {r.attack.split(':')[0]}"
            f" ({r.view}): {r.result.iterations} it, {r.result.seconds:.1f} s{scored} -> {r.path}")


def run_attacks(
    records: Sequence[Path],
    attacks: Sequence[str],
    views: Sequence[str],
    options: AttackOptions = AttackOptions(),
    events: Events = SILENT,
) -> list[AttackOutcome]:
    """Every attack in every view on every record (files, or folders searched recursively).

    Everything is checked before the first attack runs: the views, the attack specs,
    the device, the LPIPS trunk, and every record (a record named directly that does
    not load is an error; a file in a folder that is not a record is skipped), and that
    every attack on every record fits ``options.max_memory`` (:mod:`gia_bench.budget`).
    Results come back in order.

    ``events``: ``on_start(attacks to run, "attack", plan)``, then each skipped file
    (``on_skip(path, why)``); per attack ``on_step(done, "rec.safetensors dlg-naive",
    {"iteration", "iterations", "loss"})`` as it iterates, then ``on_result(label,``
    :func:`result_line` ``)`` (reused results too) and ``on_step(done + 1, label)``.
    """
    from gia_bench.registry import trusted

    with trusted(options.plugins):
        for v in views:
            if v not in VIEWS:
                raise GiaBenchError(f"--view {v!r} is not one of {', '.join(VIEWS)}")
        check_lpips_net(options.lpips_net)
        built = [create(spec) for spec in attacks]  # a bad spec fails before any work
        resolve_device(options.device)
        if options.lpips_weights is not None and not Path(options.lpips_weights).is_file():
            raise GiaBenchError(f"--lpips-weights {options.lpips_weights}: no such file")
        paths: list[Path] = []
        skipped: list[Skipped] = []
        for path, named in find_record_files([Path(r) for r in records]):
            try:
                record = load_record(path)
            except RecordError as exc:
                if named:
                    raise
                skipped.append(Skipped(path, str(exc)))
                continue
            for attack in built:  # too large for this machine is an error: the user may raise --max-memory
                check_attack(record.meta, attack, options.max_memory, path)
            paths.append(path)
        for s in skipped:  # said even when nothing is left to run: the user learns why
            events.on_skip(str(s.path), s.reason)
        if not paths:
            raise GiaBenchError(f"no gradient records found in {', '.join(map(str, records))}")
        jobs = [(path, spec, view) for path in paths for spec in attacks for view in views]
        events.on_start(len(jobs), "attack", f"{len(jobs)} attacks on {len(paths)} records")
        results = []
        for done, (path, spec, view) in enumerate(jobs):
            label = f"{path.name} {spec.split(':')[0]}-{view}"

            def progress(i: int, total: int, loss: float, done: int = done, label: str = label) -> None:
                events.on_step(done, label, {"iteration": i, "iterations": total, "loss": loss})

            try:
                result = evaluate(
                    path, spec, view, Path(options.out), seed=options.seed, device=options.device,
                    lpips_net=options.lpips_net, lpips_weights=options.lpips_weights, progress=progress,
                    max_memory=options.max_memory,
                )
                results.append(result)
                events.on_result(label, result_line(result))
            except NotApplicable as exc:  # the attack refused this record and said why: the grid goes on
                events.on_skip(label, str(exc))
            events.on_step(done + 1, label)
        return results
