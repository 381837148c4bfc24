"""``tag``: TAG, continuous optimisation of dummy word embeddings to match the gradient (text).

Deng et al., "TAG: Gradient Attack on Transformer-based Language Models", Findings of
EMNLP 2021, Sec. 3: dummy inputs (here the word embeddings fed to the model, ``inputs_embeds``)
are optimised with Adam so that their gradient matches the observed one under the distance

    D = |g' - g|_2^2 / |g|_2^2  +  alpha |g' - g|_1 / |g|_1

(TAG's L2 + alpha L1; each term is divided by the observation's own size here so that
``alpha`` weighs the two alike at any gradient scale). Then every optimised embedding is
mapped to the nearest token by cosine similarity (TAG: to the closest embedding row), here
subject to every token of the bag being used at least once (``cover``, an exact assignment,
:func:`covering`): the bag is what the embedding gradient shows, every one of its tokens is in
the batch, and TAG's own mapping drops some and repeats others.

What this implementation takes from the record, never from the truth file:

* labels: the classifier bias gradient (iDLG-style, :func:`~gia_bench.text.attacks_tokens.bias_labels`),
  as the other text attacks;
* the sentence length: the row support of the position-embedding gradient (BERT: rows
  p < L carry gradient, padding none; all B sentences are given the longest length), or,
  without position embeddings (Llama), the token bag's size / B;
* the vocabulary of the nearest-token step: the word-embedding gradient's token bag (its rows'
  spread; the aware view adds LQ-SGD's signed-zero rows, as the ``tokens`` attack's aware bag) when
  there is one (every compressor but noise keeps it), else
  every token; the result says which (``vocabulary``);
* the word-embedding table's own gradient is not matched: the dummy is fed as embeddings, so
  its candidate gradient there is unknown; the decoded one stands in (a constant).

Views (:mod:`gia_bench.attacks.views`): ``naive`` matches the decoded gradient; ``aware``
matches the compressor's simulated messages (PowerSGD/LQ-SGD's projection with the known Q,
Top-k's mask ...; the worker's error-feedback residual assumed zero, exact at step 0).
``restarts`` random starts, ``iterations`` Adam steps each; the iterate with the lowest
distance wins (budget: iterations x restarts, reported like the image attacks').
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from gia_bench.attacks.base import Attack, AttackError, Budget, NotApplicable, Reconstruction, register
from gia_bench.attacks.views import build_view
from gia_bench.receiver import decode_record, record_model
from gia_bench.registry import Range
from gia_bench.text.attacks_tokens import bias_labels, record_bag, token_bag
from gia_bench.text.data import is_text, join_rows


def length_from_positions(model, decoded: list[torch.Tensor], index: dict[int, int], batch: int, bag: int,
                          longest: int) -> tuple[int, str]:
    """The sentence length the gradient shows: the position-embedding gradient's row support, else bag / B."""
    table = getattr(getattr(getattr(model.net, "bert", None), "embeddings", None), "position_embeddings", None)
    if table is not None:
        rows = decoded[index[id(table.weight)]].to(torch.float64)
        spread = rows.max(dim=1).values - rows.min(dim=1).values  # 0 on unused rows, also under signSGD
        used = torch.nonzero(spread > 1e-6 * float(spread.max())).flatten() if float(spread.max()) > 0 else None
        if used is not None and used.numel():
            return min(int(used.max()) + 1, longest), "position-embedding gradient support"
    return max(1, min(longest, math.ceil(bag / batch))), "token bag size / B"


def distance(candidate: list[torch.Tensor], target: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """TAG's L2 + alpha L1 over the observation in pieces, each term relative to the target's size."""
    return Distance(target, alpha)(candidate)


class Distance:
    """:func:`distance` to one fixed target, for an optimisation loop: the target's norms are summed
    once, and so are the pieces of the observation that do not depend on the dummy (the word table's,
    fed as a constant: half of MiniLM's parameters), found on the first call by ``requires_grad``.
    Same value as :func:`distance`, up to the order of the sums."""

    def __init__(self, target: list[torch.Tensor], alpha: float) -> None:
        self.target, self.alpha = target, alpha
        self.t2 = sum((t.to(torch.float64) ** 2).sum() for t in target).clamp_min(1e-30)
        self.t1 = sum(t.to(torch.float64).abs().sum() for t in target).clamp_min(1e-30)
        self.live: list[int] | None = None
        self.c2 = self.c1 = 0.0

    def __call__(self, candidate: list[torch.Tensor]) -> torch.Tensor:
        if self.live is None or not any(c.requires_grad for c in candidate):
            pairs = list(zip(candidate, self.target))
            if any(c.requires_grad for c in candidate):  # the constant pieces, summed once
                self.live = [i for i, c in enumerate(candidate) if c.requires_grad]
                const = [(c, t) for c, t in pairs if not c.requires_grad]
                self.c2 = float(sum(((c - t).to(torch.float64) ** 2).sum() for c, t in const))
                self.c1 = float(sum((c - t).to(torch.float64).abs().sum() for c, t in const))
                pairs = [pairs[i] for i in self.live]
            else:
                return (sum(((c - t) ** 2).sum() for c, t in pairs) / self.t2
                        + self.alpha * sum((c - t).abs().sum() for c, t in pairs) / self.t1)
        else:
            pairs = [(candidate[i], self.target[i]) for i in self.live]
        l2 = self.c2 + sum(((c - t) ** 2).sum() for c, t in pairs)
        l1 = self.c1 + sum((c - t).abs().sum() for c, t in pairs)
        return l2 / self.t2 + self.alpha * l1 / self.t1


def covering(sim: torch.Tensor) -> torch.Tensor:
    """Per position, a token index: the most similar, subject to every token being used at least once
    (``sim``: positions x tokens, tokens <= positions). Exact: each token takes one representative
    position by an assignment on the regret ``max_t sim(p, t) - sim(p, t)``; the other positions
    keep their most similar token (their regret is 0), so the total similarity is the largest the
    constraint allows."""
    best = sim.argmax(dim=1)
    regret = sim.max(dim=1, keepdim=True).values - sim
    rows, cols = linear_sum_assignment(regret.numpy())
    best[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return best


@register("tag")
class TAG(Attack):
    """TAG (Deng et al. 2021): Adam on dummy word embeddings, L2 + alpha L1 gradient distance, nearest tokens.

    Args:
        iterations: Adam steps per restart.
        restarts: independent random starts; the lowest gradient distance wins.
        lr: Adam's learning rate (embedding units: the table's row scale is about 0.05).
        alpha: weight of the L1 term (relative distances, see the module docstring).
        cover: map the embeddings to tokens so that every token of the bag is used at least once (the
            bag is exact: each of its tokens is in the batch); false: each to its nearest token, as TAG.
    """

    views = ("naive", "aware")

    def __init__(self, iterations: Annotated[int, Range(1, 100_000)] = 200,
                 restarts: Annotated[int, Range(1, 64)] = 2, lr: Annotated[float, Range(1e-6, 10.0)] = 0.01,
                 alpha: Annotated[float, Range(0.0, 100.0)] = 0.1, cover: bool = True) -> None:
        self.iterations, self.restarts, self.lr, self.alpha = int(iterations), int(restarts), float(lr), float(alpha)
        self.cover = bool(cover)

    @property
    def budget(self) -> Budget:
        return Budget(iterations=self.iterations, restarts=self.restarts)

    @property
    def published_budget(self) -> Budget | None:
        return None  # TAG's paper states no iteration count to compare with

    def run(self, record, view, generator, progress=None, device="cpu") -> Reconstruction:
        self.check_view(view)
        spec = record.meta.dataset
        if not is_text(spec):
            raise AttackError(f"attack 'tag' needs a text record, {record.meta.record_id} holds {spec.name!r}")
        if not record.meta.is_fedsgd:  # the matching is of one gradient; the image attacks simulate K steps
            raise NotApplicable(
                f"record {record.meta.record_id}: skipped by tag: a FedAvg update of {record.meta.local_steps} local"
                " steps is a sum of gradients at different weights, and tag matches one gradient (tokens and"
                " dager read such records)"
            )
        threat = build_view(record, view)
        model = record_model(record)  # the recorded mode (train: dropout draws from torch's global generator)
        named = list(model.named_parameters())
        index = {id(p): i for i, (_, p) in enumerate(named)}
        words = model.embedding.weight
        for p in model.parameters():  # every gradient but the word table's is matched
            p.requires_grad_(p is not words)
        decoded = decode_record(record)
        batch, longest = record.meta.batch_size, spec.shape[2]
        at = index[id(words)]  # naive: the decoded gradient's rows only; aware: LQ-SGD's signed zeros too
        bag, _ = record_bag(record, decoded[at], at, "aware", 1e-6) if view == "aware" else token_bag(
            decoded[at], "aware", 1e-6)
        use_bag = 0 < bag.numel() <= batch * longest
        vocab = bag if use_bag else torch.arange(words.shape[0])
        length, length_from = length_from_positions(model, decoded, index, batch, int(bag.numel()), longest)
        labels, strategy = bias_labels(record, decoded)
        mask = torch.zeros(batch, longest, dtype=torch.int64)
        mask[:, :length] = 1
        best, losses, first = self._optimise(model, named, index[id(words)], threat, decoded, labels, mask, words, generator,
                                      progress)
        with torch.no_grad():
            table = F.normalize(words[vocab].to(torch.float64), dim=1)
            sim = F.normalize(best[:, :length].to(torch.float64), dim=2) @ table.T  # (B, length, |vocab|)
        cover = self.cover and use_bag and vocab.numel() <= batch * length
        ids = torch.zeros(batch, longest, dtype=torch.int64)
        ids[:, :length] = vocab[covering(sim.reshape(batch * length, -1)).reshape(batch, length) if cover
                                else sim.argmax(dim=2)]
        return Reconstruction(
            inputs=join_rows(ids, mask), labels=labels, iterations=self.iterations, final_loss=min(losses), view=view,
            label_strategy=strategy, observed=threat.observed, public_state_used=threat.public_state_used,
            budget=Budget(self.iterations, self.restarts, evaluations=self.iterations * self.restarts),
            extra={"vocabulary": "token bag of the embedding gradient" if use_bag else "whole vocabulary",
                   "mapping": "nearest, every bag token at least once" if cover else "nearest token",
                   "vocabulary_size": int(vocab.numel()), "length": length, "length_from": length_from,
                   "distance_per_restart": losses, "distance_at_start": first, "residual": threat.residual},
        )

    def _optimise(self, model, named, word_index: int, threat, decoded, labels, mask, words, generator, progress
                  ) -> tuple[torch.Tensor, list[float], list[float]]:
        """Adam on the dummy embeddings, ``restarts`` times; the best iterate over all (by distance)."""
        params = [p for i, (_, p) in enumerate(named) if i != word_index]
        target = [t.detach() for t in threat.segments]
        measure = Distance(target, self.alpha)
        fixed = decoded[word_index].unsqueeze(0)  # the word table's gradient: not matched (constant)
        scale = float(words.detach().std())
        batch, longest = mask.shape
        best, best_loss, losses, first = None, math.inf, [], []
        for restart in range(self.restarts):
            dummy = (torch.randn(batch, longest, words.shape[1], generator=generator) * scale).requires_grad_(True)
            opt = torch.optim.Adam([dummy], lr=self.lr)
            own = math.inf
            for it in range(self.iterations):
                logits = model.net(inputs_embeds=dummy, attention_mask=mask).logits
                grads = torch.autograd.grad(F.cross_entropy(logits, labels), params, create_graph=True)
                full, k = [], 0
                for i in range(len(named)):
                    if i == word_index:
                        full.append(fixed)
                    else:
                        full.append(grads[k].unsqueeze(0))
                        k += 1
                loss = measure([c[0] for c in threat.candidate_segments(full)])
                value = float(loss.detach())
                if it == 0:
                    first.append(value)
                own = min(own, value)
                if value < best_loss:
                    best, best_loss = dummy.detach().clone(), value
                opt.zero_grad()
                (g,) = torch.autograd.grad(loss, dummy)
                dummy.grad = g
                opt.step()
                if progress is not None:
                    progress(restart * self.iterations + it + 1, self.restarts * self.iterations, value)
            losses.append(own)
        return best, losses, first
