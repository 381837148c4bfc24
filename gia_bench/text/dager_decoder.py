"""DAGER on decoders (Llama: ``smollm2``, ``transformer:arch=llama``): token set from layer 1, sentences greedily.

DAGER (Petrov et al., NeurIPS 2024), Sec. 5 for decoders. Every linear layer reading the
residual stream has the weight gradient ``G = sum_p delta_p x_p^T``, so (eval mode, B x T < d)
the row space of the first layer's stacked q/k/v gradients is span{x_p}, where for a Llama
``x_p = RMSNorm(E[v_p])`` depends on the token alone (RoPE is applied after the
projections). So:

1. tokens: the vocabulary rows (the embedding gradient's bag when it is one) whose
   normalised embedding lies in that span;
2. sentences, position by position (causal: the first layer's output at position p depends
   on tokens 0..p only): every kept prefix is extended by every token of step 1, and an
   extension is kept when the second layer's input at its last position lies in the row space
   of the second layer's q/k/v gradients. A prefix with no kept extension is a finished
   sentence (padding carries no gradient, so nothing matches after a sentence's end).

Tolerances come from the numerical rank: the rank is the largest gap of the singular
values (:func:`gap_rank`), and a span distance is "inside" below the geometric mean of the
noise level (the first singular value past the gap over the largest) and 1, the distance
of a direction the span does not hold.
"""

from __future__ import annotations

import torch

from gia_bench.text.dager import span_distance


def gap_rank(s: torch.Tensor, floor: float = 1e-12) -> tuple[int, float]:
    """(rank, noise): the rank at the largest ratio gap s[i] / s[i+1] of the singular values ``s``
    (descending), and s[rank] / s[0] (0 at full rank), the relative level of what lies past it."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0, 0.0
    rel = (s / s[0]).clamp_min(floor)
    if rel.numel() == 1:
        return 1, 0.0
    ratios = rel[:-1] / rel[1:]
    rank = int(torch.argmax(ratios)) + 1
    if float(ratios.max()) < 1e3 and float(rel[-1]) > 1e-4:  # no gap at all: the span is full
        return int(s.numel()), 0.0
    return rank, float(rel[rank]) if rank < rel.numel() else 0.0


def input_span(gradients: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(orthonormal basis d_in x r, tolerance) of the common row space of the layers' gradients."""
    stacked = torch.cat([g.to(torch.float64).reshape(g.shape[0], -1) for g in gradients], dim=0)
    _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    rank, noise = gap_rank(s)
    # a direction inside the span sits at about the noise level, one outside at ~1: split in between
    # (log scale). A looser noise ** (1 / 4) admits spurious extensions on smollm2 (measured: exact
    # 4/4 -> 0/4 at B = 4); this one misses near-collinear runs ("7 7 7") of a random-init model.
    tol = max(noise, 1e-16) ** 0.5
    return vh[:rank].T, tol


def _attention_last(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The first layer's output (N, d) at the last position of ``hidden`` (N, P, d) (causal, no padding)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    n, p, _ = hidden.shape
    hd = attn.head_dim
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x[:, -1:]).view(n, 1, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(n, p, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(n, p, -1, hd).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * attn.scaling, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, 1, -1)
    h = hidden[:, -1:] + attn.o_proj(out)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h[:, 0]


def second_inputs(llama, prefixes: torch.Tensor) -> torch.Tensor:
    """The second layer's normalised input (N, d) at the last position of each prefix (N, P)."""
    n, p = prefixes.shape
    hidden = llama.embed_tokens(prefixes)
    positions = torch.arange(p).unsqueeze(0).expand(n, p)
    cos, sin = llama.rotary_emb(hidden, positions)
    out = _attention_last(llama.layers[0], hidden, cos, sin)
    return llama.layers[1].input_layernorm(out)


def first_inputs(llama, tokens: torch.Tensor) -> torch.Tensor:
    """The first layer's normalised input (N, d) of each token."""
    return llama.layers[0].input_layernorm(llama.embed_tokens(tokens))


def layer_gradients(model, decoded: list[torch.Tensor], index: int) -> list[torch.Tensor]:
    attn = model.net.model.layers[index].self_attn
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    names = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    return [decoded[names[id(p)]] for p in params]


def decode_sentences(model, decoded: list[torch.Tensor], vocab: torch.Tensor, batch: int, length: int,
                     beam: int = 4) -> tuple[list[list[int]], dict]:
    """Steps 1-2: the batch's sentences (at most ``batch``), and what the search saw."""
    llama = model.net.model
    basis1, tol1 = input_span(layer_gradients(model, decoded, 0))
    basis2, tol2 = input_span(layer_gradients(model, decoded, 1))
    with torch.no_grad():
        dist = span_distance(first_inputs(llama, vocab), basis1)
        tokens = vocab[dist < tol1]
        if tokens.numel() > batch * length:  # more than the batch can hold: the closest
            tokens = vocab[torch.argsort(dist)[: batch * length]]
        finished: list[tuple[list[int], float]] = []
        prefixes: list[tuple[list[int], float]] = [([], 0.0)]
        for _ in range(length):
            if not prefixes or tokens.numel() == 0:
                break
            grown: list[tuple[list[int], float]] = []
            for prefix, score in prefixes:
                seqs = torch.cat([torch.tensor(prefix, dtype=torch.int64).expand(tokens.numel(), len(prefix)),
                                  tokens.unsqueeze(1)], dim=1)
                d2 = span_distance(second_inputs(llama, seqs), basis2)
                kept = torch.nonzero(d2 < tol2).flatten()
                if kept.numel() == 0:
                    if prefix:
                        finished.append((prefix, score))
                    continue
                for i in kept.tolist():
                    token = int(tokens[i])
                    # a run of one token (t, t, ..., t) reaches the second layer as the same vector at every
                    # position (attention mixes equal values): always inside the span, so never evidence
                    if prefix and all(t == token for t in prefix):
                        continue
                    grown.append((prefix + [token], max(score, float(d2[i]))))
                if not any(g[0][:-1] == prefix for g in grown[-kept.numel():]) and prefix:
                    finished.append((prefix, score))
            # keep the closest (greedy: at most beam x B prefixes alive)
            grown.sort(key=lambda item: item[1])
            prefixes = grown[: beam * batch]
        finished += prefixes
    # the longest sentences first (a prefix of a finished sentence is not a sentence of its own)
    finished.sort(key=lambda item: (-len(item[0]), item[1]))
    sentences: list[list[int]] = []
    for s, _ in finished:
        if len(sentences) < batch and not any(t[: len(s)] == s for t in sentences):
            sentences.append(s)
    info = {"rank_layer1": int(basis1.shape[1]), "rank_layer2": int(basis2.shape[1]), "tol_layer1": tol1,
            "tol_layer2": tol2, "tokens_found": int(tokens.numel()), "vocabulary_checked": int(vocab.numel())}
    return sentences, info
