"""Scoring a text reconstruction for :func:`gia_bench.evaluate.evaluate`: text metrics and a readable file.

The result keeps the image schema: one entry per original (sentence), each with its paired
reconstruction and every text metric by name; ``ssim`` and ``psnr`` are NaN (not defined
on text). Token ids are never clamped to [0, 1] as pixels are. ``reconstruction.txt``
shows each reconstruction beside its original, decoded with the data set's tokenizer,
recovered tokens (those of the original that occur in the reconstruction) in [brackets].
"""

from __future__ import annotations

from pathlib import Path

import torch

from gia_bench.data import DatasetSpec
from gia_bench.io import atomic_write_text
from gia_bench.metrics import BatchScores, ImageScores
from gia_bench.registry import parse_spec
from gia_bench.text.metrics import KEYS, score_text, sequences


def text_batch_scores(rec_inputs: torch.Tensor, rec_labels: torch.Tensor, truth_inputs: torch.Tensor,
                      truth_labels: torch.Tensor) -> BatchScores:
    """:class:`BatchScores` of a text batch: per sentence the text metrics; label accuracy after pairing."""
    scores = score_text(rec_inputs, truth_inputs)
    entries = tuple(
        ImageScores(i, j, {k: scores.values[k][i] for k in KEYS})
        for i, j in enumerate(scores.paired)
    )
    matched = list(scores.paired)
    accuracy = float((rec_labels.reshape(-1)[matched].cpu() == truth_labels.reshape(-1).cpu()).double().mean())
    return BatchScores(entries, accuracy, "LPIPS is not defined on text", {}, {})


TEXT_FILE = "reconstruction.txt"  # beside result.json, in place of the image grid


def tokenizer_of(spec: DatasetSpec):
    """The tokenizer a text data set spec names (``tokenizer=...``, default bert)."""
    from gia_bench.text.deps import tokenizer

    return tokenizer(parse_spec(spec.name).kwargs.get("tokenizer", "bert"))


def render(rec_inputs: torch.Tensor, truth_inputs: torch.Tensor | None, spec: DatasetSpec) -> str:
    """Each reconstruction (recovered tokens in brackets) beside its original, one block per sentence."""
    tok = tokenizer_of(spec)
    rec = sequences(rec_inputs)
    orig = sequences(truth_inputs) if truth_inputs is not None else [None] * len(rec)
    lines = []
    for i, (r, o) in enumerate(zip(rec, orig)):
        known = set(o or ())
        pieces = [f"[{tok.decode([t])}]" if t in known else tok.decode([t]) for t in r]
        lines.append(f"#{i} reconstruction: {' '.join(pieces)}")
        if o is not None:
            lines.append(f"#{i} original:       {tok.decode(o)}")
    return "\n".join(lines) + "\n"


def save_text(path: Path, rec_inputs: torch.Tensor, truth_inputs: torch.Tensor | None, spec: DatasetSpec) -> None:
    atomic_write_text(path, render(rec_inputs, truth_inputs, spec))
