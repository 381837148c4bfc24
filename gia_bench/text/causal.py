"""The causal-LM task (``smollm2:task=lm``, ``transformer:arch=llama,task=lm``): the next-token loss.

A model with ``task="lm"`` returns its token logits as ``(B, V, T - 1)`` (classes second,
as :func:`torch.nn.functional.cross_entropy` takes a K-dimensional input) and names its own
targets, :meth:`targets`: the next token ids ``(B, T - 1)``, with ``IGNORE`` wherever the
predicting or the predicted token is padding (right padding). So

    F.cross_entropy(model(x), targets_for(model, x, y))

is the token-mean next-token cross-entropy over the non-padding tokens (the first token of
a sentence is never a target), and for a classifier, which names no targets, it is the
plain cross-entropy against the labels: capture (:func:`gia_bench.capture.compute_gradient`)
and the trainer call exactly that, and records keep ``loss = "cross_entropy"``.

What the LM task does not have: a class. Its "accuracy" in training is next-token top-1
accuracy over the non-padding targets; label inference reads nothing. SmolLM2 ties its
output head to the word embedding, so the embedding's gradient has every vocabulary row
(the head's softmax touches all of them): the token-bag attack's row support is the
classifier's property, not this task's. ``dager`` reads the first two layers only, but a
sentence's last token is out of its reach: under the causal mask the last position feeds only
its own output, which predicts nothing, so it adds no gradient at any layer. Gradient-matching
attacks compute the classifier's loss and refuse these records by shape.
"""

from __future__ import annotations

import torch
from torch import nn

TASKS = ("classify", "lm")
IGNORE = -100  # cross_entropy's default ignore_index


def lm_logits(token_logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of a causal LM -> (B, V, T - 1): position t predicts token t + 1."""
    return token_logits[:, :-1].transpose(1, 2)


def lm_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) next token ids, :data:`IGNORE` where either token of the pair is padding."""
    valid = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    return torch.where(valid, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))


def targets_for(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What ``model``'s output is scored against: its own :meth:`targets` (a causal LM), else ``labels``.

    A DistributedDataParallel wrapper is looked through (``.module``).
    """
    own = getattr(getattr(model, "module", model), "targets", None)
    return labels if own is None else own(inputs, labels)


def correct_and_total(output: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 hits and scored positions: one per example (classification), one per non-ignored token (LM)."""
    keep = targets != IGNORE
    hits = (output.argmax(1) == targets) & keep
    return hits.sum(), keep.sum()
