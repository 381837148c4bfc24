"""Text data sets: seeded PII sentences with their fields marked, the written topics set, the layout."""

import torch

from gia_bench.data import DATASETS, load_dataset
from gia_bench.text.data import PII_FIELDS, ROW_FIELD, ROW_IDS, ROW_MASK, is_text, pii_sentence, topics_sentences
from gia_bench.text.deps import tokenizer


def test_pii_sentences_are_seeded_and_fields_are_their_values():
    a, b, other = pii_sentence(0, 5), pii_sentence(0, 5), pii_sentence(1, 5)
    assert a == b and a.text != other.text
    assert a.fields
    for kind, start, end in a.fields:
        assert kind in PII_FIELDS and 0 <= start < end <= len(a.text)


def test_pii_field_row_marks_exactly_the_field_tokens():
    data = load_dataset("pii", split="train")
    tok = tokenizer("bert")
    assert is_text(data.spec) and data.spec.shape == (1, 3, 32) and data.spec.num_classes == 4
    for i in range(5):
        rows = data.images01[i, 0].to(torch.int64)
        sentence = data.sentences[i]
        for code, (kind, start, end) in enumerate(sentence.fields):
            marked = rows[ROW_IDS][rows[ROW_FIELD] == 1 + PII_FIELDS.index(kind)].tolist()
            value = sentence.text[start:end]
            # the marked tokens decode to the field's value (WordPiece lower-cases, drops spaces around '-')
            assert tok.decode(marked).replace(" ", "") == tok.decode(tok(value)["input_ids"][1:-1]).replace(" ", "")
        n = int(rows[ROW_MASK].sum())
        assert rows[ROW_MASK, :n].eq(1).all() and rows[ROW_MASK, n:].eq(0).all()
        assert rows[ROW_IDS, 0] == tok.cls_token_id and rows[ROW_IDS, n - 1] == tok.sep_token_id


def test_pii_train_and_test_are_disjoint_and_deterministic():
    train, test = load_dataset("pii", split="train"), load_dataset("pii", split="test")
    assert not {s.text for s in train.sentences} & {s.text for s in test.sentences}
    again = DATASETS.create("pii").load("train")
    assert torch.equal(again.images01, train.images01) and torch.equal(again.labels, train.labels)


def test_topics_has_at_least_200_labelled_sentences_in_4_classes():
    sentences = topics_sentences()
    assert len(sentences) >= 200 and len({s.text for s in sentences}) == len(sentences)
    assert {s.label for s in sentences} == {0, 1, 2, 3}
    data = load_dataset("topics", split="test")
    x, y = data.batch([0, 1, 2])
    assert x.shape == (3, 1, 3, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # normalisation is the identity: ids stay exact
    assert torch.equal(x, data.images01[:3])
