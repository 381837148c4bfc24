"""Models: the architectures the papers describe, seeded initialisation, shapes from the data set."""

import pytest
import torch
from torch import nn

from gia_bench.errors import SpecError
from gia_bench.models import MODELS, ConvNet, LeNet, ModelSpec, build_model


def _count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), len(params)


@pytest.mark.parametrize("name", ["lenet", "convnet:width=8", "resnet18", "mlp"])
@pytest.mark.parametrize("shape, classes", [((3, 32, 32), 10), ((1, 32, 32), 2), ((3, 16, 16), 7)])
def test_every_model_takes_the_data_shape_and_classes(name, shape, classes):
    model = build_model(ModelSpec(name, shape, classes, "eval"), seed=0)
    out = model(torch.zeros(2, *shape))
    assert out.shape == (2, classes) and bool(torch.isfinite(out).all())
    assert not model.training


@pytest.mark.parametrize("name", ["lenet", "convnet:width=8", "resnet18", "mlp"])
def test_seeded_init_is_reproducible_and_leaves_global_rng_alone(name):
    spec = ModelSpec(name, (3, 32, 32), 10)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(spec, seed=0)
    assert torch.equal(torch.rand(3), before)  # build_model forks the global generator
    b, c = build_model(spec, seed=0), build_model(spec, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert a.training  # default mode: train


def test_lenet_is_dlgs():
    """Zhu et al. 2019: 3 conv 5x5 of 12 channels (strides 2, 2, 1), sigmoid, FC 768 -> classes, U(-0.5, 0.5)."""
    model = build_model(ModelSpec("lenet", (3, 32, 32), 10), seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (12, (5, 5), (2, 2)), (12, (5, 5), (2, 2)), (12, (5, 5), (1, 1))
    ]
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 3
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d, nn.BatchNorm2d)) for m in model.modules())
    assert model.fc.in_features == 768
    assert _count(model) == (15_826, 8)  # the 15,826 values of ANCHORS' Top-k 1% figure
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert flat.abs().max() <= 0.5 and flat.abs().max() > 0.499
    # U(-0.5, 0.5): mean 0, std 1/sqrt(12) = 0.2887 (15,826 draws: standard error ~0.002)
    assert abs(float(flat.mean())) < 0.01 and abs(float(flat.std()) - 12**-0.5) < 0.01
    narrow = LeNet(init_range=0.1)
    assert max(p.abs().max() for p in narrow.parameters()) <= 0.1


def test_convnet_is_inverting_gradients():
    """Geiping et al. 2020 (ConvNetBN): 8 conv-BN-ReLU (w, 2w, 2w, 4w, 4w, 4w, 4w, 4w), 3x3 max-pools after 6 and 8."""
    model = ConvNet(width=16)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 32, 64, 64, 64, 64, 64]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert model.fc.in_features == 36 * 16  # 32 -> 10 -> 3 after the two 3x3 pools: Linear(36 * width)
    # the authors' default width 64: 2,904,970 parameters for 10 classes
    assert _count(ConvNet(width=64)) == (2_904_970, 34)


def test_resnet18_has_the_cifar_stem():
    model = build_model(ModelSpec("resnet18", (3, 32, 32), 10), seed=0)
    conv1 = model.net.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and isinstance(model.net.maxpool, nn.Identity)
    # torchvision's 11,181,642 (ImageNet stem, 10 classes) minus 64*3*(49-9) for the 3x3 stem
    assert _count(model) == (11_181_642 - 64 * 3 * 40, 62)
    # no down-sampling in the stem: layer1 sees the full 32x32
    seen = {}

    def hook(module, inputs, output):
        seen["shape"] = tuple(output.shape)

    model.net.layer1.register_forward_hook(hook)
    model(torch.zeros(1, 3, 32, 32))
    assert seen["shape"] == (1, 64, 32, 32)


def test_mlp_depth_and_bad_specs():
    model = build_model(ModelSpec("mlp:hidden=32,depth=2", (1, 8, 8), 3), seed=0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 32), (32, 3)]
    with pytest.raises(SpecError, match=r"parameter 'depth': 0 is outside its range \[1, 64\]"):
        build_model(ModelSpec("mlp:depth=0", (1, 8, 8), 3))
    with pytest.raises(SpecError, match="unknown model 'vgg'"):
        build_model(ModelSpec("vgg", (3, 32, 32), 10))
    with pytest.raises(SpecError, match="unknown parameter 'depth'"):
        build_model(ModelSpec("lenet:depth=3", (3, 32, 32), 10))
    with pytest.raises(SpecError, match="convnet"):  # too small for two 3x3 max-pools
        build_model(ModelSpec("convnet", (3, 4, 4), 10))


def test_model_spec_json_round_trip_and_mode_check():
    spec = ModelSpec("convnet:width=8", (1, 32, 32), 2, "eval")
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert spec.to_json() == {"spec": "convnet:width=8", "in_shape": (1, 32, 32), "num_classes": 2, "mode": "eval"}
    with pytest.raises(ValueError, match="mode"):
        ModelSpec.from_json({**spec.to_json(), "mode": "predict"})
    assert set(MODELS.names()) >= {"lenet", "convnet", "resnet18", "mlp"}


@pytest.mark.parametrize(
    "given, canonical",
    [("convnet", "convnet:width=64"), ("convnet:width=8", "convnet:width=8"), ("lenet", "lenet:init_range=0.5"),
     ("mlp:depth=2", "mlp:hidden=256,depth=2"), ("resnet18", "resnet18")],
)  # fmt: skip
def test_build_recorded_canonicalises_the_spec_and_builds_the_same_model(given, canonical):
    """The one builder of recorded models: the record's spec names every parameter, the weights are
    build_model's with the same seed, and building from the canonical spec gives it back unchanged."""
    from gia_bench.data import load_dataset
    from gia_bench.models import build_recorded

    data = load_dataset("digits", split="train").spec
    spec = ModelSpec.for_data(given, data, "eval")
    assert (spec.in_shape, spec.num_classes, spec.mode) == (tuple(data.shape), data.num_classes, "eval")
    model, recorded = build_recorded(spec, seed=4)
    assert recorded == ModelSpec(canonical, spec.in_shape, spec.num_classes, "eval")
    plain = build_model(spec, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert not model.training
    again, same = build_recorded(recorded, seed=4)
    assert same == recorded
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
