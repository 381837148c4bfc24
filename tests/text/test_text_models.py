"""Text models: seeded builds, meta builds with the real shapes, eager double backward, input checks."""

import pytest
import torch

from gia_bench.data import load_dataset
from gia_bench.errors import SpecError
from gia_bench.models import MODELS, ModelSpec, build_model

SHAPE = (1, 3, 16)


def _spec(name, mode="eval", shape=SHAPE):
    return ModelSpec(name, shape, 4, mode)


def test_text_models_are_registered_with_modality_text():
    for name in ("minilm", "smollm2", "transformer"):
        assert MODELS.get(name).modality == "text"


def test_transformer_is_seeded_and_its_meta_build_has_the_same_parameters():
    a = build_model(_spec("transformer:d=32,layers=1,vocab=50"), seed=3)
    b = build_model(_spec("transformer:d=32,layers=1,vocab=50"), seed=3)
    c = build_model(_spec("transformer:d=32,layers=1,vocab=50"), seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    with torch.device("meta"):
        meta = build_model(_spec("transformer:d=32,layers=1,vocab=50"), seed=None, device=None)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in sa.items()}


def test_eager_attention_has_a_double_backward():
    model = build_model(_spec("transformer:d=32,layers=1,vocab=50"), seed=0)
    x = torch.zeros(2, *SHAPE)
    x[:, 0, 0, :10] = torch.arange(10).float() + 1
    x[:, 0, 1, :10] = 1
    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), params[-1])[0]
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_padding_does_not_change_the_logits():
    # the attention mask is read from the layout: extra padding is invisible to the classifier
    model = build_model(_spec("transformer:d=32,layers=1,vocab=50"), seed=0)
    short = torch.zeros(1, 1, 3, 8)
    short[0, 0, 0, :5] = torch.tensor([1.0, 7, 8, 9, 2])
    short[0, 0, 1, :5] = 1
    long = torch.zeros(1, *SHAPE)
    long[..., :8] = short
    long[0, 0, 0, 8:] = 0
    torch.testing.assert_close(model(short), model(long), rtol=1e-5, atol=1e-5)


def test_image_input_and_foreign_token_ids_are_refused_in_one_line():
    with pytest.raises(SpecError, match="reads text"):
        build_model(ModelSpec("transformer", (3, 32, 32), 10, "eval"), seed=0)
    model = build_model(_spec("transformer:d=32,layers=1,vocab=50"), seed=0)
    x = torch.zeros(1, *SHAPE)
    x[0, 0, 0, 0] = 60
    with pytest.raises(SpecError, match="50 token ids"):
        model(x)


def test_minilm_loads_the_pretrained_encoder_offline():
    data = load_dataset("topics", split="train")
    model = build_model(ModelSpec("minilm", data.spec.shape, 4, "eval"), seed=0)
    assert model.net.config.hidden_size == 384 and model.net.config.num_hidden_layers == 6
    assert model.net.config._attn_implementation == "eager"
    # pretrained: two sentences of one topic are closer in [CLS] space than sentences of two topics
    x, y = data.batch(range(40))
    with torch.no_grad():
        ids, mask = x[:, 0, 0].long(), x[:, 0, 1].long()
        cls = model.net.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    cls = torch.nn.functional.normalize(cls, dim=1)
    sim = cls @ cls.T
    same = (y[:, None] == y[None, :]) & ~torch.eye(40, dtype=torch.bool)
    assert sim[same].mean() > sim[y[:, None] != y[None, :]].mean()


def test_a_missing_text_package_is_one_line_naming_the_install(monkeypatch):
    import importlib

    from gia_bench.errors import GiaBenchError
    from gia_bench.text import deps

    real = importlib.import_module

    def without_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ModuleNotFoundError("No module named 'transformers'", name="transformers")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(deps.importlib, "import_module", without_transformers)
    deps.transformers.cache_clear()
    try:
        with pytest.raises(GiaBenchError, match=r"needs the package 'transformers'.*pip install -e '\.\[text\]'") as exc:
            build_model(_spec("transformer:d=32,layers=1,vocab=50"), seed=0)
        assert "\n" not in str(exc.value)
    finally:
        deps.transformers.cache_clear()


@pytest.mark.slow
def test_smollm2_classifies_and_leaks_its_token_bag():
    # SmolLM2-135M dequantized from Q4_1 (~30 s idle, once per process; then a cached safetensors file)
    from gia_bench.attacks import create as create_attack
    from gia_bench.capture import capture_batch
    from gia_bench.defenses import create as create_defense
    from gia_bench.text.metrics import token_f1

    data = load_dataset("pii:tokenizer=smollm2", split="train")
    spec = ModelSpec("smollm2", data.spec.shape, 4, "eval")
    model = build_model(spec, seed=0)
    assert model.net.config.hidden_size == 576
    x, y = data.batch([0, 1])
    record, truth = capture_batch(model, spec, data.spec, x, y, create_defense("powersgd:rank=1"), "s")
    rec = create_attack("tokens").run(record, "aware", torch.Generator())
    assert token_f1(rec.inputs, truth.inputs) == 1.0
