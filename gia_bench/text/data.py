"""Text data sets: ``pii`` (seeded Faker sentences with their PII fields) and ``topics`` (240 written sentences).

How a sentence travels (the *text layout*): a batch is a float32 tensor (B, 1, 3, T), so it
fits the record and truth formats unchanged, and its :class:`~gia_bench.data.DatasetSpec`
has shape (1, 3, T), mean 0 and std 1 (normalisation is the identity):

* row :data:`ROW_IDS`: the token ids (exact in fp32: every vocabulary here is < 2**24);
* row :data:`ROW_MASK`: the attention mask (1 on tokens, 0 on right padding);
* row :data:`ROW_FIELD`: 1 + the index in :data:`PII_FIELDS` of the PII field a token belongs
  to, 0 elsewhere (the ``pii`` metric reads it from the truth file; models ignore it).

The truth file of a text record therefore holds the token ids, the attention mask and the
PII fields; an attack returns the same layout (field row 0: the attacker does not know it).
Sentences are tokenized by the data set (``tokenizer=bert`` for ``minilm``, ``smollm2``
for ``smollm2``), padded to ``length`` tokens; a sentence longer than that is skipped
(never truncated, so a PII field is never cut).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch

from gia_bench.data import DATASETS, SPLITS, DatasetSpec, DataSource, TensorImageDataset, seeded_split
from gia_bench.errors import DataError
from gia_bench.registry import Range

ROW_IDS, ROW_MASK, ROW_FIELD = 0, 1, 2
PII_FIELDS = ("name", "address", "email", "phone", "date", "company", "card")
TOKENIZERS = ("bert", "smollm2")
LENGTH = Range(4, 512)
SIZE = Range(8, 100_000)
SENTENCES_TSV = Path(__file__).with_name("sentences.tsv")


def is_text_shape(shape: Sequence[int]) -> bool:
    """Whether an input shape is the text layout's (1, 3, T); no built-in image set is 3 pixels high."""
    return len(shape) == 3 and shape[0] == 1 and shape[1] == 3


def is_text(spec: DatasetSpec) -> bool:
    """Whether ``spec`` describes text in the layout above."""
    return is_text_shape(spec.shape)


def text_spec(name: str, length: int, num_classes: int) -> DatasetSpec:
    return DatasetSpec(name, (1, 3, length), num_classes, (0.0,), (1.0,))


def split_rows(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, field) int64 tensors (B, T) of a (B, 1, 3, T) text batch."""
    if inputs.dim() != 4 or inputs.shape[1] != 1 or inputs.shape[2] != 3:
        raise ValueError(f"expected a (B, 1, 3, T) text batch, got {tuple(inputs.shape)}")
    rows = inputs[:, 0].round().to(torch.int64)
    return rows[:, ROW_IDS], rows[:, ROW_MASK], rows[:, ROW_FIELD]


def join_rows(ids: torch.Tensor, mask: torch.Tensor, field: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, 1, 3, T) float32 batch of (B, T) ids, mask and (optional) field rows."""
    field = torch.zeros_like(ids) if field is None else field
    return torch.stack([ids, mask, field], dim=1).unsqueeze(1).to(torch.float32)


@dataclasses.dataclass(frozen=True)
class Sentence:
    """One sentence: its text, label and the character spans of its PII fields ``(kind, start, end)``."""

    text: str
    label: int
    fields: tuple[tuple[str, int, int], ...] = ()


def encode(sentence: Sentence, tokenizer, length: int, pad_id: int) -> torch.Tensor | None:
    """The (3, length) rows of one sentence, or None when it needs more than ``length`` tokens."""
    enc = tokenizer(sentence.text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if len(ids) > length:
        return None
    field = [0] * len(ids)
    for kind, start, end in sentence.fields:
        code = 1 + PII_FIELDS.index(kind)
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if b > a and a < end and b > start:  # the token overlaps the field's characters
                field[i] = code
    rows = torch.zeros(3, length, dtype=torch.int64)
    rows[ROW_IDS] = pad_id
    rows[ROW_IDS, : len(ids)] = torch.tensor(ids)
    rows[ROW_MASK, : len(ids)] = 1
    rows[ROW_FIELD, : len(ids)] = torch.tensor(field)
    return rows


def pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


class TextDataset(TensorImageDataset):
    """Tokenized sentences in the text layout; ``sentences[i]`` is the source of item ``i``."""

    def __init__(self, rows: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, split: str,
                 sentences: Sequence[Sentence]) -> None:
        super().__init__(rows.unsqueeze(1).to(torch.float32), labels, spec, split)
        self.sentences = list(sentences)


class TextSource(DataSource):
    """Base of the text data sets: tokenizer and length are spec parameters (they shape the records)."""

    modality: ClassVar[str] = "text"
    num_classes: ClassVar[int]
    tokenizer: str
    length: int

    def sentences(self) -> list[Sentence]:
        """Candidate sentences in their fixed order (more than needed; too long ones are skipped)."""
        raise NotImplementedError

    def load(self, split: str = "train", root: Path | None = None, download: bool = False) -> TextDataset:
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        spec_string = self.spec_string
        if spec_string not in _TOKENIZED:  # deterministic; capture and tests load the same set again
            _TOKENIZED[spec_string] = _tokenize(spec_string, self.tokenizer, self.length, self.sentences())
        rows, labels, kept = _TOKENIZED[spec_string]
        index = seeded_split(len(kept), split)
        spec = text_spec(self.spec_string, self.length, self.num_classes)
        return TextDataset(rows[index], labels[index], spec, split, [kept[int(i)] for i in index])


_TOKENIZED: dict[str, tuple[torch.Tensor, torch.Tensor, list[Sentence]]] = {}


def _tokenize(spec: str, tokenizer_name: str, length: int, source: Sequence[Sentence]) -> tuple:
    from gia_bench.text.deps import tokenizer as get_tokenizer

    tok = get_tokenizer(tokenizer_name)
    pad = pad_id(tok)
    rows, labels, kept = [], [], []
    for sentence in source:
        encoded = encode(sentence, tok, length, pad)
        if encoded is not None:
            rows.append(encoded)
            labels.append(sentence.label)
            kept.append(sentence)
    if len(kept) < 8:
        raise DataError(f"dataset {spec!r}: only {len(kept)} sentences fit in length={length} tokens; raise length")
    return torch.stack(rows), torch.tensor(labels, dtype=torch.int64), kept


# -- pii -------------------------------------------------------------------------------------------

# Each template: a label (the classification target) and parts: literal text or {field}.
PII_TEMPLATES: tuple[tuple[int, str], ...] = (
    (0, "Please call {name} at {phone} before {date}."),
    (0, "You can reach {name} by e-mail at {email} today."),
    (1, "Send the parcel to {name}, {address}."),
    (1, "{name} moved to {address} last year."),
    (2, "Card {card} belongs to {name} of {company}."),
    (2, "{company} charged card {card} on {date}."),
    (3, "{name} joined {company} on {date}."),
    (3, "Contact {email} or {phone} for {company} support."),
)


def _fake_value(fake, kind: str) -> str:
    if kind == "name":
        return fake.name()
    if kind == "address":
        return fake.address().replace("\n", ", ")
    if kind == "email":
        return fake.email()
    if kind == "phone":
        return fake.phone_number()
    if kind == "date":
        return fake.date()
    if kind == "company":
        return fake.company()
    if kind == "card":
        return fake.credit_card_number()
    raise ValueError(kind)


def pii_sentence(seed: int, index: int) -> Sentence:
    """The ``index``-th PII sentence of ``seed``: a template and Faker values, all seeded by (seed, index)."""
    from gia_bench.text.deps import require

    faker = require("faker", "dataset 'pii'")
    fake = faker.Faker("en_US")
    fake.seed_instance(seed * 1_000_003 + index)
    label, template = PII_TEMPLATES[index % len(PII_TEMPLATES)]
    text, fields = "", []
    rest = template
    while "{" in rest:
        before, _, after = rest.partition("{")
        kind, _, rest = after.partition("}")
        text += before
        value = _fake_value(fake, kind)
        fields.append((kind, len(text), len(text) + len(value)))
        text += value
    text += rest
    return Sentence(text, label, tuple(fields))


@DATASETS.register("pii")
class PII(TextSource):
    """Seeded Faker sentences (en_US) carrying names, addresses, e-mails, phones, dates, companies, cards.

    Eight templates, two per class (0 contact, 1 address, 2 payment, 3 employment); the
    PII fields' tokens are marked in the truth file (see the text layout).

    Args:
        tokenizer: "bert" (MiniLM's WordPiece, for minilm / transformer) or "smollm2".
        length: tokens per sentence, padding included; longer sentences are skipped.
        size: sentences drawn (train + test), before skipping.
        seed: Faker seed of the sentences.
    """

    num_classes: ClassVar[int] = 4

    def __init__(self, tokenizer: Literal["bert", "smollm2"] = "bert", length: Annotated[int, LENGTH] = 32,
                 size: Annotated[int, SIZE] = 400, seed: int = 0) -> None:
        self.tokenizer, self.length, self.size, self.seed = tokenizer, length, size, seed

    def sentences(self) -> list[Sentence]:
        return [pii_sentence(self.seed, i) for i in range(self.size)]


@functools.cache
def topics_sentences() -> tuple[Sentence, ...]:
    """The sentences of ``gia_bench/text/sentences.tsv`` (``label<TAB>sentence``; ``#`` comments)."""
    out = []
    for number, line in enumerate(SENTENCES_TSV.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        label, sep, text = line.partition("\t")
        if not sep or not label.isdigit():
            raise DataError(f"{SENTENCES_TSV}:{number}: expected 'label<TAB>sentence'")
        out.append(Sentence(text.strip(), int(label)))
    return tuple(out)


@DATASETS.register("topics")
class Topics(TextSource):
    """240 short English sentences written for gia-bench, 4 topics (sports, weather, food, technology).

    Args:
        tokenizer: "bert" (MiniLM's WordPiece, for minilm / transformer) or "smollm2".
        length: tokens per sentence, padding included.
    """

    num_classes: ClassVar[int] = 4

    def __init__(self, tokenizer: Literal["bert", "smollm2"] = "bert", length: Annotated[int, LENGTH] = 32) -> None:
        self.tokenizer, self.length = tokenizer, length

    def sentences(self) -> list[Sentence]:
        return list(topics_sentences())
