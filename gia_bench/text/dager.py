"""``dager``: exact token recovery by span checks on the first two layers' gradients (encoders).

DAGER (Petrov et al., NeurIPS 2024, "DAGER: Exact Gradient Inversion for Large Language
Models"), Sec. 4: a linear layer's weight gradient is ``G = sum_p delta_p x_p^T`` over the
batch's B x T positions, so every input x_p lies in the row space of G, and (while B x T < d
and the deltas are independent) the row space *is* span{x_p}. For a BERT encoder in eval
mode the first layer's query input is ``x = LayerNorm(E[v] + P[p] + T[0])``: a function of the
token v and its position p only. So:

1. numerical rank r of the first query gradient G1 (singular values above ``rtol`` times the
   largest), and the basis of its row space;
2. for every position p and every token v of the vocabulary (the embedding gradient's token
   bag when there is one, :mod:`gia_bench.text.attacks_tokens`), the distance of x(v, p) to that
   span, relative to |x(v, p)|; the pairs below ``tol`` x sqrt(1 - r / d) (the distance of a
   random direction: the tolerance follows the numerical rank) are the batch's tokens at
   position p (with B = 1: the sentence, exactly);
3. B > 1 (search, as DAGER does for encoders): the tokens found at each position are split
   into B sentences by coordinate search on the second layer: a sentence is right when every
   output of the first layer at its positions lies in the row space of the second query
   gradient G2. Starting from the tokens of each position in a fixed order, re-order the
   slots at one position, or at it and all later positions, whenever that lowers the summed
   span distance of the sentences, until no move helps (a local search: not always the optimum).

Train mode (dropout) breaks the exact span check, and so do compressors that change the
first layers' gradients (this is the naive view: the decoded gradient); the result says
how many positions matched. Llama decoders (``smollm2``, ``transformer:arch=llama``) are
handled greedily, position by position, in :mod:`gia_bench.text.dager_decoder`. The aware view
(``--view aware``: sparse recovery from PowerSGD / LQ-SGD factors, never weaker than this naive
path) is :mod:`gia_bench.text.dager_aware`.
"""

from __future__ import annotations

import itertools
from typing import Annotated

import torch

from gia_bench.attacks.base import Attack, AttackError, Reconstruction, register
from gia_bench.receiver import decode_record, record_model
from gia_bench.registry import Range
from gia_bench.text.attacks_tokens import bias_labels, token_bag
from gia_bench.text.data import is_text, join_rows

TOL = Range(0.0, 1.0)


def row_space(gradient: torch.Tensor, rtol: float) -> torch.Tensor:
    """An orthonormal basis (d_in x r) of the row space of ``gradient`` at numerical rank r."""
    _, s, vh = torch.linalg.svd(gradient.to(torch.float64), full_matrices=False)
    rank = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return vh[:rank].T


def span_distance(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """|x - B B^T x| / |x| for each row of ``x``."""
    x = x.to(torch.float64)
    residual = x - (x @ basis) @ basis.T
    return residual.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)


def _param_index(model: torch.nn.Module, tensor: torch.Tensor) -> int:
    return next(i for i, (_, p) in enumerate(model.named_parameters()) if p is tensor)


def _end_token(spec) -> int | None:
    """The token that ends a sentence of this data set's tokenizer ([SEP] for BERT), if any."""
    from gia_bench.text.evaluate import tokenizer_of

    tok = tokenizer_of(spec)
    return tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id


@register("dager")
class Dager(Attack):
    """DAGER: tokens from the first layer's span, sentences from the second's (encoders: search; decoders: greedy);
    aware view: SOMP on PowerSGD / LQ-SGD's Q factors.

    Args:
        tol: a (token, position) is in the batch when its relative span distance is below
            tol x sqrt(1 - r / d), the distance of a random direction to a rank-r span.
        rtol: singular values above rtol x the largest count in the numerical rank.
        sweeps: coordinate-search passes over the positions (B > 1).
    """

    views = ("naive", "aware")

    def __init__(self, tol: Annotated[float, TOL] = 0.01, rtol: Annotated[float, TOL] = 1e-5,
                 sweeps: Annotated[int, Range(0, 100)] = 4) -> None:
        self.tol, self.rtol, self.sweeps = float(tol), float(rtol), int(sweeps)

    def run(self, record, view, generator, progress=None, device="cpu") -> Reconstruction:
        self.check_view(view)
        spec = record.meta.dataset
        if not is_text(spec):
            raise AttackError(f"attack 'dager' needs a text record, {record.meta.record_id} holds {spec.name!r}")
        model = record_model(record).eval()
        if view == "aware":  # sparse recovery from PowerSGD / LQ-SGD factors, never weaker than naive
            from gia_bench.text.dager_aware import run_aware

            return run_aware(self, record, model, lambda p: _param_index(model, p))
        return self.run_model(record, model, view)

    def run_model(self, record, model, view: str) -> Reconstruction:
        """The naive path on the record's model (built once by :meth:`run`)."""
        spec = record.meta.dataset
        bert = getattr(model.net, "bert", None)
        if bert is None and hasattr(getattr(model.net, "model", None), "layers"):
            return self._run_decoder(record, model, view)
        if bert is None:
            raise AttackError(f"attack 'dager' handles BERT encoders (minilm, transformer), not {record.meta.model.spec!r}")
        decoded = decode_record(record)
        layers = bert.encoder.layer
        g1 = decoded[_param_index(model, layers[0].attention.self.query.weight)]
        basis1 = row_space(g1, self.rtol)
        length, batch = spec.shape[2], record.meta.batch_size
        # The vocabulary to check: the token bag of the embedding gradient (attacks_tokens) when it is
        # a bag (at most B x T rows used), else every token (e.g. under noise).
        emb = bert.embeddings
        words = emb.word_embeddings.weight
        bag, _ = token_bag(decoded[_param_index(model, words)], "aware", 1e-6)
        vocab = bag if 0 < bag.numel() <= batch * length else torch.arange(words.shape[0])
        d = basis1.shape[0]
        threshold = self.tol * (1.0 - basis1.shape[1] / d) ** 0.5
        with torch.no_grad():
            candidates: list[list[int]] = []
            for p in range(length):
                x = emb.LayerNorm(words[vocab] + emb.position_embeddings.weight[p] + emb.token_type_embeddings.weight[0])
                dist = span_distance(x, basis1)
                found = torch.nonzero(dist < threshold).flatten()
                found = found[torch.argsort(dist[found])][:batch]
                candidates.append(vocab[found].tolist())
            sentences = self._assign(model, decoded, candidates, batch, _end_token(spec))
        ids = torch.zeros(batch, length, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for b, sentence in enumerate(sentences):
            ids[b, : len(sentence)] = torch.tensor(sentence, dtype=torch.int64)
            mask[b, : len(sentence)] = 1
        labels, strategy = bias_labels(record, decoded)
        return Reconstruction(
            inputs=join_rows(ids, mask), labels=labels, iterations=0, final_loss=float("nan"), view=view,
            label_strategy=strategy, observed="decoded gradient",
            extra={"rank_layer1": int(basis1.shape[1]), "positions_found": sum(1 for c in candidates if c),
                   "vocabulary_checked": int(vocab.numel())},
        )

    def _run_decoder(self, record, model, view: str) -> Reconstruction:
        """Llama decoders: :mod:`gia_bench.text.dager_decoder` (greedy, position by position)."""
        from gia_bench.text.dager_decoder import decode_sentences

        spec = record.meta.dataset
        decoded = decode_record(record)
        words = model.embedding.weight
        length, batch = spec.shape[2], record.meta.batch_size
        bag, _ = token_bag(decoded[_param_index(model, words)], "aware", 1e-6)
        vocab = bag if 0 < bag.numel() <= batch * length else torch.arange(words.shape[0])
        sentences, info = decode_sentences(model, decoded, vocab, batch, length)
        return self._reconstruction(record, decoded, sentences, view, info)

    def _reconstruction(self, record, decoded, sentences: list[list[int]], view: str, info: dict) -> Reconstruction:
        """The sentences in the text layout (fewer than B: the rest left empty), labels from the bias."""
        length, batch = record.meta.dataset.shape[2], record.meta.batch_size
        ids = torch.zeros(batch, length, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for b, sentence in enumerate(sentences[:batch]):
            ids[b, : len(sentence)] = torch.tensor(sentence[:length], dtype=torch.int64)
            mask[b, : len(sentence)] = 1
        labels, strategy = bias_labels(record, decoded)
        return Reconstruction(
            inputs=join_rows(ids, mask), labels=labels, iterations=0, final_loss=float("nan"), view=view,
            label_strategy=strategy, observed="decoded gradient", extra=info,
        )

    def _assign(self, model, decoded, candidates: list[list[int]], batch: int, end_token: int | None = None
                ) -> list[list[int]]:
        """Split the tokens found at each position into ``batch`` sentences (step 3)."""
        # a sentence ends at the first position where no token of it is found (right padding)
        columns = []
        for found in candidates:
            if not found:
                break
            columns.append(found)
        if batch == 1:
            return [[c[0] for c in columns]]
        bert = model.net.bert
        g2 = decoded[_param_index(model, bert.encoder.layer[1].attention.self.query.weight)]
        basis2 = row_space(g2, self.rtol)

        def sentences_of(choice: list[tuple[int, ...]]) -> list[list[int]]:
            out: list[list[int]] = [[] for _ in range(batch)]
            for slots in choice:
                for b, token in enumerate(slots):
                    if not out[b] or out[b][-1] != end_token:  # a sentence stops after its [SEP]
                        out[b].append(token)
            return out

        def cost(choice: list[tuple[int | None, ...]]) -> float:
            total = 0.0
            for sentence in sentences_of(choice):
                if sentence:
                    hidden = bert.embeddings(input_ids=torch.tensor([sentence]))
                    out = bert.encoder.layer[0](hidden)
                    out = out[0] if isinstance(out, tuple) else out
                    total += float(span_distance(out[0], basis2).sum())
            return total

        # each position: the found tokens padded with None (sentences already ended) to B slots
        # fewer tokens than sentences at a position: shared tokens ([CLS], a common word) or ended
        # sentences; the found tokens are repeated to fill the B slots, the end token cuts the rest
        choice = [tuple(c[i % len(c)] for i in range(batch)) for c in columns]
        best = cost(choice)
        for _ in range(self.sweeps):
            improved = False
            for p in range(len(choice)):
                if len(set(choice[p])) == 1:
                    continue
                for order in itertools.permutations(range(batch)):
                    if order == tuple(range(batch)):
                        continue
                    # re-order the slots at p alone, or at p and every later position (a sentence's tail)
                    for end in (p + 1, len(choice)):
                        trial = choice[:p] + [tuple(slots[i] for i in order) for slots in choice[p:end]] + choice[end:]
                        value = cost(trial)
                        if value < best - 1e-12:
                            choice, best, improved = trial, value, True
            if not improved:
                break
        return sentences_of(choice)
