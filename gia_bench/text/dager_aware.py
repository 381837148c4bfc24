"""``dager --view aware``: sparse recovery of the tokens from PowerSGD / LQ-SGD factors.

PowerSGD (and LQ-SGD, whose factors travel log-quantized) sends each compressed weight
gradient ``M = G = sum_p delta_p x_p^T`` (n x m) as ``P = M Q_init`` and
``Q = M^T P_hat = sum_p x_p (delta_p^T P_hat)`` (m x r, :mod:`gia_bench.defenses.powersgd`
steps 4-7). So the r columns of every layer's Q are linear mixes of that layer's inputs
x_p: they lie in span{x_p}. The decoded gradient ``P_hat Q^T`` has rank r, so naive DAGER's
span check (row space of the decoded gradient, rank r << B x T) finds almost nothing; the
factors themselves still say which inputs were mixed. The aware view:

1. **candidates**: the word-embedding gradient's row support (the ``tokens`` attack's aware
   bag; under PowerSGD the decoded rows are ``P_hat`` rows, non-zero exactly where M's rows are:
   the used tokens), or the whole vocabulary when there is no bag (noise);
2. **tokens (SOMP)**: the observation ``Y1`` stacks the first layer's q/k/v Q columns (each
   scaled to unit norm). Simultaneous OMP (Tropp, Gilbert & Strauss 2006): pick the candidate
   first-layer input (Llama: ``RMSNorm(E[v])``; BERT: ``LayerNorm(E[v] + P[p] + T[0])``, one atom
   per (token, position)) whose projection off the chosen span is most correlated with Y1's
   residual, project it out, repeat while the relative residual is above 3 x the factors' noise
   level (float rounding under PowerSGD, the log codec's public error under LQ-SGD) and some
   candidate explains more than that noise. When the candidates are the embedding gradient's
   support, the ones SOMP leaves (too small a share of Y1 to tell from the noise) are kept
   after the confirmed ones: the support already shows they were used;
3. **sentences**: decoders: the same greedy on the second layer's q/k/v Q columns ``Y2``, one
   position at a time: every sentence's next token is chosen among the tokens of step 2 by how
   much of Y2's residual its second-layer input (a function of the prefix, causal) explains;
   the sentences end when every token of step 2 is placed or no extension explains more than the
   noise (a local, greedy order: not always the sentence order; repeats are kept only where
   the greedy chose them before the last token was placed). Encoders: the atoms of step 2 carry their position; the
   tokens found at a position fill the B sentences in turn.
4. **never weaker**: the naive path runs too, and the result whose tokens leave the smaller
   residual of Y1 (the attacker's own criterion, no truth read) is kept.

The worker's error-feedback residual ``e`` (it sent the factors of ``G + e``) is unknown to
the attacker and **assumed zero**, as in the image aware views: exact for a fresh compressor
(``capture``'s step 0). Mid-training the factors also mix the inputs of earlier batches kept in
``e``, so step 2 can find earlier batches' tokens among the candidates.
"""

from __future__ import annotations

import dataclasses

import torch

from gia_bench.attacks.exact import codec_error
from gia_bench.receiver import decode_record, record_compressor
from gia_bench.registry import parse_spec
from gia_bench.text.attacks_tokens import record_bag


@dataclasses.dataclass(frozen=True)
class SompResult:
    """The atoms SOMP chose (indices into the dictionary, in the order chosen) and the relative
    residual of the observation after each choice."""

    chosen: list[int]
    residuals: list[float]


def factor_columns(record, model) -> dict[int, torch.Tensor] | None:
    """Parameter index -> the Q factor (m x r, float64) of every compressed matrix; None when the
    record's compressor sends no factors (not PowerSGD / LQ-SGD, or a warm-up step)."""
    if parse_spec(record.meta.defense).name not in ("powersgd", "lqsgd") or "grads" in record.messages:
        return None
    compressor = record_compressor(record)
    shapes = [torch.Size(s) for s in record.param_shapes]
    plan = compressor.plan(shapes)
    values = compressor.message_values(record.messages, shapes, record.public)
    out: dict[int, torch.Tensor] = {}
    for g in plan.groups:
        qs = values["Q"][g.q_offset : g.q_offset + g.q_numel].view(g.count, g.m, g.r)
        for k, i in enumerate(g.indices):
            out[i] = qs[k].to(torch.float64)
    return out


def noise_level(record) -> float:
    """The factors' relative error the attacker expects (public): LQ-SGD's codec error, else fp32 rounding."""
    compressor = record_compressor(record)
    if parse_spec(record.meta.defense).name == "lqsgd":
        return codec_error(compressor.bits, compressor.alpha)
    return 1e-6


def observation(columns: dict[int, torch.Tensor], indices: list[int]) -> torch.Tensor | None:
    """The Q columns of these parameters side by side (d x k), each scaled to unit norm (q, k and v
    differ in scale; each says as much about the span); None if any of them was not compressed."""
    if any(i not in columns for i in indices):
        return None
    y = torch.cat([columns[i] for i in indices], dim=1)
    return y / y.norm(dim=0, keepdim=True).clamp_min(1e-30)


def relative_residual(y: torch.Tensor, atoms: torch.Tensor) -> float:
    """|Y - proj_span(atoms) Y|_F / |Y|_F (atoms: rows, d each)."""
    if atoms.numel() == 0:
        return 1.0
    q, _ = torch.linalg.qr(atoms.to(torch.float64).T)
    r = y - q @ (q.T @ y)
    return float(r.norm() / y.norm().clamp_min(1e-30))


def somp(y: torch.Tensor, atoms: torch.Tensor, max_atoms: int, tol: float, floor: float | None = None) -> SompResult:
    """Simultaneous OMP: atoms (K x d) chosen greedily to explain the columns of ``y`` (d x k).

    Each step picks the atom whose component off the chosen span, normalised, has the largest
    correlation (L2 over the columns) with the residual; stops when the relative residual is
    below ``tol``, after ``max_atoms`` atoms, or when no atom explains more than ``floor`` (default
    ``tol``) of it: below the noise level a choice is not evidence.
    """
    a = atoms.to(torch.float64)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-30)
    perp = a.clone()  # the atoms with the chosen span projected out (updated one direction at a time)
    residual = y.to(torch.float64).clone()
    total = float(residual.norm()) or 1.0
    chosen: list[int] = []
    history: list[float] = []
    taken = torch.zeros(a.shape[0], dtype=torch.bool)
    while len(chosen) < max_atoms and float(residual.norm()) / total > tol:
        norms = perp.norm(dim=1)
        mask = (~taken) & (norms > 1e-6)  # an atom (nearly) inside the chosen span adds nothing
        if not bool(mask.any()):
            break
        score = (perp @ residual).norm(dim=1) / norms.clamp_min(1e-30)
        score[~mask] = -1.0
        best = int(torch.argmax(score))
        if float(score[best]) / total <= (tol if floor is None else floor):
            break
        u = perp[best] / norms[best]
        residual -= torch.outer(u, u @ residual)
        perp -= torch.outer(perp @ u, u)
        chosen.append(best)
        taken[best] = True
        history.append(float(residual.norm()) / total)
    return SompResult(chosen, history)


def candidates(record, model, decoded: list[torch.Tensor], index_of, batch: int, length: int) -> torch.Tensor:
    """Step 1: the embedding gradient's token bag (aware, LQ-SGD's signed zeros included), or every
    token when it is no bag."""
    words = model.embedding.weight
    bag, _ = record_bag(record, decoded[index_of(words)], index_of(words), "aware", 1e-6)
    return bag if 0 < bag.numel() <= batch * length else torch.arange(words.shape[0])


def decoder_tokens(model, columns, index_of, vocab: torch.Tensor, budget: int, noise: float
                   ) -> tuple[torch.Tensor, dict]:
    """Step 2 on a Llama decoder: the tokens whose normalised embeddings SOMP needs for Y1."""
    from gia_bench.text.dager_decoder import first_inputs

    llama = model.net.model
    attn = llama.layers[0].self_attn
    y1 = observation(columns, [index_of(p.weight) for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
    if y1 is None:
        return torch.zeros(0, dtype=torch.int64), {"aware": "the first layer's q/k/v were not compressed"}
    with torch.no_grad():
        atoms = first_inputs(llama, vocab)
    found = somp(y1, atoms, min(budget, y1.shape[0] - 1), 3.0 * noise, noise)
    tokens = vocab[torch.tensor(found.chosen, dtype=torch.int64)]
    return tokens, {"somp_tokens": len(found.chosen), "somp_residual": found.residuals[-1] if found.residuals else 1.0}


def decoder_sentences(model, columns, index_of, tokens: torch.Tensor, batch: int, length: int, noise: float
                      ) -> tuple[list[list[int]], dict]:
    """Step 3 on a decoder: B sentences grown together, one token at a time, by OMP on Y2."""
    from gia_bench.text.dager_decoder import second_inputs

    llama = model.net.model
    attn = llama.layers[1].self_attn
    y2 = observation(columns, [index_of(p.weight) for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
    if y2 is None or tokens.numel() == 0:
        # no second-layer observation: the bag in the order SOMP found it, one sentence after another
        flat = tokens.tolist()
        size = max(1, -(-len(flat) // batch))
        return [flat[b * size : (b + 1) * size] for b in range(batch) if flat[b * size : (b + 1) * size]], {
            "order": "none (second layer not compressed)"}
    y = y2.clone()
    total = float(y.norm())
    basis = torch.zeros(y.shape[0], 0, dtype=torch.float64)
    sentences: list[list[int]] = [[] for _ in range(batch)]
    open_ = [True] * batch
    with torch.no_grad():
        while any(open_) and float(y.norm()) / total > 3.0 * noise:
            placed = {t for s in sentences for t in s}
            unplaced = sum(int(t) not in placed for t in tokens)
            # done once every token of step 2 is placed (a repeat is kept only where it was chosen before);
            # and keep room for every token (below: appended where the order left room)
            if unplaced == 0 or batch * length - sum(map(len, sentences)) <= unplaced:
                break
            best = (-1.0, -1, -1, None)
            for b in range(batch):
                if not open_[b]:
                    continue
                prefix = torch.tensor(sentences[b], dtype=torch.int64).expand(tokens.numel(), len(sentences[b]))
                x = second_inputs(llama, torch.cat([prefix, tokens.unsqueeze(1)], dim=1)).to(torch.float64)
                x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
                perp = x - (x @ basis) @ basis.T
                norms = perp.norm(dim=1)
                score = (perp @ y).norm(dim=1) / norms.clamp_min(1e-30)
                score[norms < 1e-6] = -1.0  # e.g. a run t, t: the same input as t alone
                i = int(torch.argmax(score))
                if float(score[i]) > best[0]:
                    best = (float(score[i]), b, i, perp[i] / norms[i])
            score, b, i, u = best
            if u is None or score / total <= noise:
                break
            sentences[b].append(int(tokens[i]))
            open_[b] = len(sentences[b]) < length
            y = y - torch.outer(u, u @ y)
            basis = torch.cat([basis, u.unsqueeze(1)], dim=1)
    # tokens step 2 found but the order did not place (it stopped or ran out of length): appended to the
    # sentences in turn, so the sentences carry the whole bag (their positions there are a guess)
    placed = {t for s in sentences for t in s}
    left = [int(t) for t in tokens if int(t) not in placed]
    for k, token in enumerate(left):
        free = [b for b in range(batch) if len(sentences[b]) < length]
        if not free:
            break
        sentences[free[k % len(free)]].append(token)
    kept = [s for s in sentences if s]
    return kept, {"order_residual": float(y.norm()) / total, "order": "greedy OMP on layer 2's Q",
                  "appended_unordered": len(left)}


def decoder_residual(model, columns, index_of, sentences: list[list[int]]) -> float:
    """Step 4's criterion: Y1's relative residual off the span of the sentences' first-layer inputs."""
    from gia_bench.text.dager_decoder import first_inputs

    llama = model.net.model
    attn = llama.layers[0].self_attn
    y1 = observation(columns, [index_of(p.weight) for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
    if y1 is None:
        return 1.0
    used = sorted({t for s in sentences for t in s})
    if not used:
        return 1.0
    with torch.no_grad():
        atoms = first_inputs(llama, torch.tensor(used, dtype=torch.int64))
    return relative_residual(y1, atoms)


def aware_decoder(record, model, index_of) -> tuple[list[list[int]], dict, float] | None:
    """Steps 1-3 on a Llama decoder: (sentences, info, Y1 residual); None without factors."""
    columns = factor_columns(record, model)
    if columns is None:
        return None
    decoded = decode_record(record)
    batch, length = record.meta.batch_size, record.meta.dataset.shape[2]
    noise = noise_level(record)
    vocab = candidates(record, model, decoded, index_of, batch, length)
    tokens, info = decoder_tokens(model, columns, index_of, vocab, batch * length, noise)
    if vocab.numel() <= batch * length:
        # the candidates are the embedding gradient's support: each of them was used, and the ones SOMP
        # leaves (explaining less of Y1 than the noise) are kept too, after the confirmed ones
        confirmed = set(tokens.tolist())
        rest = [t for t in vocab.tolist() if t not in confirmed]
        tokens = torch.cat([tokens, torch.tensor(rest, dtype=torch.int64)])
        info["bag_unconfirmed"] = len(rest)
    sentences, order = decoder_sentences(model, columns, index_of, tokens, batch, length, noise)
    info.update(order, vocabulary_checked=int(vocab.numel()), noise=noise)
    return sentences, info, decoder_residual(model, columns, index_of, sentences)


def run_aware(attack, record, model, index_of):
    """Step 4: the naive path and the aware one; keep the result whose tokens explain more of Y1.

    ``attack`` is the :class:`~gia_bench.text.dager.Dager` instance (its naive path and layout).
    """
    from gia_bench.text.metrics import sequences

    naive = attack.run_model(record, model, "naive")
    decoder = not hasattr(model.net, "bert")
    found = aware_decoder(record, model, index_of) if decoder else aware_encoder(record, model, index_of)
    if found is None:  # no factors: the naive view is all there is
        return dataclasses.replace(naive, view="aware", extra={**naive.extra, "kept": "naive (no factors sent)"})
    sentences, info, residual = found
    columns = factor_columns(record, model)
    naive_sentences = sequences(naive.inputs)
    naive_residual = (decoder_residual(model, columns, index_of, naive_sentences) if decoder
                      else encoder_residual(model, columns, index_of, naive_sentences))
    info.update(residual_aware=residual, residual_naive=naive_residual)
    # a tie (both within the factors' noise) goes to the naive path: its sentences come from exact span checks
    if naive_residual <= max(residual, 3.0 * noise_level(record)):
        return dataclasses.replace(naive, view="aware", extra={**naive.extra, **info, "kept": "naive"})
    rec = attack._reconstruction(record, decode_record(record), sentences, "aware", {**info, "kept": "aware"})
    return dataclasses.replace(rec, observed="messages")


def _encoder_atoms(bert, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """BERT's first-layer inputs x(v, p) = LayerNorm(E[v] + P[p] + T[0]) for the pairs given."""
    emb = bert.embeddings
    with torch.no_grad():
        return emb.LayerNorm(emb.word_embeddings.weight[tokens] + emb.position_embeddings.weight[positions]
                             + emb.token_type_embeddings.weight[0])


def _encoder_y1(bert, columns, index_of) -> torch.Tensor | None:
    attn = bert.encoder.layer[0].attention.self
    return observation(columns, [index_of(p.weight) for p in (attn.query, attn.key, attn.value)])


def encoder_residual(model, columns, index_of, sentences: list[list[int]]) -> float:
    """Step 4's criterion for encoders: Y1's residual off the span of the sentences' (token, position) inputs."""
    bert = model.net.bert
    y1 = _encoder_y1(bert, columns, index_of)
    pairs = sorted({(t, p) for s in sentences for p, t in enumerate(s)})
    if y1 is None or not pairs:
        return 1.0
    tokens, positions = (torch.tensor(c, dtype=torch.int64) for c in zip(*pairs))
    return relative_residual(y1, _encoder_atoms(bert, tokens, positions))


def aware_encoder(record, model, index_of) -> tuple[list[list[int]], dict, float] | None:
    """Steps 1-3 on a BERT encoder: SOMP over (token, position) atoms; None without factors or a bag."""
    columns = factor_columns(record, model)
    if columns is None:
        return None
    bert = model.net.bert
    y1 = _encoder_y1(bert, columns, index_of)
    decoded = decode_record(record)
    batch, length = record.meta.batch_size, record.meta.dataset.shape[2]
    vocab = candidates(record, model, decoded, index_of, batch, length)
    if y1 is None or vocab.numel() > batch * length:  # every token x position: too many atoms to check
        return None
    tokens = vocab.repeat_interleave(length)
    positions = torch.arange(length).repeat(vocab.numel())
    noise = noise_level(record)
    found = somp(y1, _encoder_atoms(bert, tokens, positions), min(batch * length, y1.shape[0] - 1), 3.0 * noise, noise)
    at: list[list[int]] = [[] for _ in range(length)]
    for i in found.chosen:
        at[int(positions[i])].append(int(tokens[i]))
    sentences: list[list[int]] = [[] for _ in range(batch)]
    for column in at:
        if not column:  # a sentence ends at the first position where no token is found (right padding)
            break
        for b in range(batch):
            sentences[b].append(column[b % len(column)])
    info = {"somp_atoms": len(found.chosen), "somp_residual": found.residuals[-1] if found.residuals else 1.0,
            "order": "positions from the (token, position) atoms", "vocabulary_checked": int(vocab.numel()), "noise": noise}
    return sentences, info, encoder_residual(model, columns, index_of, sentences)
