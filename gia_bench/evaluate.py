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
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gia_bench.attacks.base import Attack, Progress, Reconstruction, create
from gia_bench.attacks.views import RESIDUAL
from gia_bench.budget import DEFAULT_MAX_MEMORY, check_attack
from gia_bench.errors import GiaBenchError, RecordError
from gia_bench.identity import (
    RESULT_SCHEMA,
    ResultConflictError,
    ResultIdentity,
    file_sha256,
    identity_of,
    named_record,
    named_record_sha256,
    result_identity,
    same_file,
)
from gia_bench.io import atomic_write_bytes, atomic_write_text
from gia_bench.receiver import load_record
from gia_bench.records import GradientRecord, Truth, find_record_files, truth_path
from gia_bench.text.data import is_text
from gia_bench.threat import VIEWS

RESULT_FILE = "result.json"
LPIPS_NETS = ("alex", "vgg")


def _other_metrics(modality: str = "image") -> list[str]:
    """Registered metrics beyond the ssim/psnr/lpips lists result.json has always had."""
    from gia_bench.metrics import METRICS  # lazy, as in _scores: importing evaluate stays light

    return [n for n, m in METRICS.items() if n not in ("ssim", "psnr", "lpips") and m.modality == modality]


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
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip(".") or "record"
    if len(name) > limit:  # a path component has at most 255 bytes; keep it unique with a hash
        import hashlib

        name = name[: limit - 13] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return name


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
class AttackResult:
    """One finished (record, attack, view): where its result.json is, what it holds, whether it was reused."""

    path: Path  # the result.json
    record: Path
    view: str
    reused: bool
    data: dict[str, Any]  # the result.json contents

    @property
    def record_id(self) -> str:
        return self.data["record_id"]

    @property
    def attack(self) -> str:
        return self.data["attack"]

    @property
    def defense(self) -> str:
        return self.data["defense"]

    def mean(self, metric: str) -> float | None:
        """Mean of a per-image metric (``psnr``, ``ssim``, ``lpips``) over the batch, or None if unscored."""
        values = [v for v in (self.data.get(metric) or []) if v is not None]
        return sum(values) / len(values) if values else None


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


def _scores(record: GradientRecord, rec: Reconstruction, truth: Truth, lpips_net: str, lpips_weights: Path | None):
    from gia_bench.metrics import get_lpips, score_batch

    spec = record.meta.dataset
    if is_text(spec):  # token ids: text metrics, never clamped as pixels (gia_bench.text.evaluate)
        from gia_bench.text.evaluate import text_batch_scores

        text = text_batch_scores(rec.inputs, rec.labels, truth.inputs, truth.labels)
        return text, rec.inputs, truth.inputs.to(torch.float32)
    rec01 = spec.denormalize(rec.inputs).clamp(0, 1)
    orig01 = spec.denormalize(truth.inputs.to(torch.float32)).clamp(0, 1)
    scores = score_batch(rec01, orig01, rec.labels, truth.labels, lpips=get_lpips(lpips_net, lpips_weights))
    return scores, rec01, orig01


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
) -> AttackResult:
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
    result_path = out_dir / RESULT_FILE
    wanted = result_identity(record.sha256, attack.spec, view, seed)
    existing = _existing(result_path)
    if existing and _check_reuse(existing, wanted, result_path, record_path, record):
        return AttackResult(result_path, record_path, view, True, existing)
    check_attack(record.meta, attack, max_memory, record_path)  # before the attack allocates anything

    tpath = truth_path(record_path)
    if view == "oracle":
        # the evaluation side, not the attack, reads the worker's private residual: an upper bound
        if not tpath.exists():
            raise GiaBenchError(f"--view oracle: {record_path} has no truth file {tpath.name} to read the residual from")
        record = record.with_private(Truth.load(tpath))

    generator = torch.Generator(device=dev)
    generator.manual_seed(seed)
    start = time.perf_counter()
    rec = attack.run(record, view, generator, progress, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start

    # The attack has returned: only now may the truth be read, to score.
    truth = Truth.load(tpath) if tpath.exists() else None
    metrics: dict[str, Any] | None = None
    spec = record.meta.dataset
    labels = rec.labels
    original01 = None
    reconstruction01 = rec.inputs if is_text(spec) else spec.denormalize(rec.inputs).clamp(0, 1)
    if truth is not None:
        if truth.inputs.shape[0] != record.meta.batch_size:
            raise RecordError(
                f"{tpath}: holds {truth.inputs.shape[0]} examples, its record {record_path} a batch of"
                f" {record.meta.batch_size}"
            )
        scores, reconstruction01, original01 = _scores(record, rec, truth, lpips_net, lpips_weights)
        order = list(scores.matching)
        reconstruction01, labels = reconstruction01[order], labels[order]
        metrics = scores.to_json()

    out_dir.mkdir(parents=True, exist_ok=True)
    # a result not reused (stale, forged, another spec) goes before the new files land: the
    # folder never pairs it with the new reconstruction; the new result.json comes last
    result_path.unlink(missing_ok=True)
    tensors = {"reconstruction": reconstruction01.contiguous()}
    if original01 is not None:
        tensors["original"] = original01.contiguous()
    from safetensors.torch import save

    atomic_write_bytes(out_dir / "reconstruction.safetensors", save(tensors))
    if is_text(spec):
        from gia_bench.text.evaluate import save_text

        save_text(out_dir / "reconstruction.txt", reconstruction01, original01, spec)
    else:
        save_grid(out_dir / "reconstruction.png", reconstruction01, original01)

    images = metrics["images"] if metrics else None
    others = _other_metrics("text" if is_text(spec) else "image")  # the metrics beside ssim/psnr/lpips
    result = {
        "schema": RESULT_SCHEMA,
        "kind": "attack_result",
        "record_id": record.record_id,
        "record": str(record_path),
        "record_sha256": record.sha256,
        "dataset": spec.name,
        "model": record.meta.model.spec,
        "defense": record.meta.defense,
        "attack": attack.spec,
        "view": view,
        "threat": {
            "model": "white-box",
            "batch_size_known": True,
            "labels": f"inferred ({rec.label_strategy})",
            "compressor_known": view in ("aware", "oracle"),
            "public_state_used": list(rec.public_state_used),
            "observed": rec.observed,
            **({"update": rec.update} if rec.update else {}),
            "residual": RESIDUAL.get(view, "not modelled"),
            "upper_bound": view == "oracle",
        },
        "step": record.meta.step,
        "source": record.meta.extra.get("source", "capture"),
        "bytes": record.meta.bytes_sent,
        "bytes_fp32": sum(int(s.numel()) * 4 for s in record.param_shapes),
        "batch_size": record.meta.batch_size,
        "labels_inferred": [int(v) for v in labels],
        "labels_true": [int(v) for v in truth.labels] if truth is not None else None,
        "seconds": seconds,
        "iterations": rec.iterations,
        "budget": (rec.budget or attack.budget).to_json(),
        "final_loss": rec.final_loss,
        "seed": seed,
        "device": str(dev),
        "metrics": metrics,
        "ssim": [im["ssim"] for im in images] if images else None,
        "psnr": [im["psnr"] for im in images] if images else None,
        "lpips": [im["lpips"] for im in images] if images else None,
        # every other registered metric (gia_bench.metrics.METRICS) the same way, by name
        **{name: [im.get(name) for im in images] if images else None for name in others},
        "label_accuracy": metrics["label_accuracy"] if metrics else None,
        "lpips_reason": metrics["lpips_reason"] if metrics else None,
        "extra": rec.extra,
    }
    atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
    return AttackResult(result_path, record_path, view, False, result)


def run_attack(
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
) -> Path:
    """:func:`evaluate`, returning the path of ``result.json`` (kept for scripts that want only the file)."""
    return evaluate(
        record_path, attack_spec, view, out_root, seed, device, lpips_net, lpips_weights, progress, max_memory
    ).path


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


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file found in a folder that is not a usable record, and why."""

    path: Path
    reason: str


#: ``on_start(record, attack_spec, view)`` -> a progress callback for that attack (or None).
OnStart = Callable[[Path, str, str], "Progress | None"]


def run_attacks(
    records: Sequence[Path],
    attacks: Sequence[str],
    views: Sequence[str],
    options: AttackOptions = AttackOptions(),
    on_start: OnStart | None = None,
    on_result: Callable[[AttackResult], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
) -> list[AttackResult]:
    """Every attack in every view on every record (files, or folders searched recursively).

    Everything is checked before the first attack runs: the views, the attack specs,
    the device, the LPIPS trunk, and every record (a record named directly that does
    not load is an error; a file in a folder that is not a record is skipped, with
    ``on_skip`` told why), and that every attack on every record fits ``options.max_memory``
    (:mod:`gia_bench.budget`). Results come back in order; ``on_result`` sees each as it
    finishes (reused ones too, marked ``reused``).
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
        for path, named in find_record_files([Path(r) for r in records]):
            try:
                record = load_record(path)
            except RecordError as exc:
                if named:
                    raise
                if on_skip is not None:
                    on_skip(Skipped(path, str(exc)))
                continue
            for attack in built:  # too large for this machine is an error: the user may raise --max-memory
                check_attack(record.meta, attack, options.max_memory, path)
            paths.append(path)
        if not paths:
            raise GiaBenchError(f"no gradient records found in {', '.join(map(str, records))}")
        results = []
        for path in paths:
            for spec in attacks:
                for view in views:
                    progress = on_start(path, spec, view) if on_start is not None else None
                    result = evaluate(
                        path, spec, view, Path(options.out), seed=options.seed, device=options.device,
                        lpips_net=options.lpips_net, lpips_weights=options.lpips_weights, progress=progress,
                        max_memory=options.max_memory,
                    )
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
        return results
