"""Models the attacks target: DLG's LeNet, the Inverting Gradients ConvNet, ResNet-18, an MLP.

Models are registered like defenses (``convnet:width=32``) and built from a
:class:`ModelSpec`, which a gradient record carries: the model spec string, the
input shape and classes (from the data set), and the mode (train/eval) in which
the gradient was computed. Initialisation is seeded and explicit.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import torch
import torchvision
from torch import nn

from gia_bench.errors import SpecError
from gia_bench.registry import Range, Registry, describe_params, parse_spec
from gia_bench.specs import ModelSpec  # the model as a record describes it

MODELS: Registry[nn.Module] = Registry("model", entry_point_group="gia_bench.models", base=nn.Module)

# Ranges of the models' parameters (the registry refuses a spec outside them in one line).
# What a model costs at a given input size is bounded per attack by gia_bench.budget.
LENET_INIT_RANGE = Range(0.0, 10.0)
CONVNET_WIDTH = Range(1, 512)
MLP_HIDDEN = Range(1, 16384)
MLP_DEPTH = Range(1, 64)


def build_model(spec: ModelSpec, seed: int | None = 0, device: torch.device | str | None = "cpu") -> nn.Module:
    """Build the model of ``spec``; ``seed`` fixes its initial weights (None: default init).

    ``device=None`` leaves the parameters where they were created (e.g. under a
    ``torch.device("meta")`` context, to check shapes without allocating).
    """
    cls, kwargs = MODELS.kwargs_for(spec.spec)
    from gia_bench.text.data import is_text_shape  # text batches have the shape (1, 3, T)

    if getattr(cls, "modality", "image") != "text" and is_text_shape(spec.in_shape):
        raise SpecError(f"model {spec.spec!r} reads images, the data is text (input {tuple(spec.in_shape)}):"
                        " use minilm, smollm2 or transformer")
    try:
        if seed is not None:
            # Layer constructors draw from the global generator; fork it so the caller's stream is untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = cls(in_shape=spec.in_shape, num_classes=spec.num_classes, **kwargs)
        else:
            model = cls(in_shape=spec.in_shape, num_classes=spec.num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # a bad parameter value, or an input too small
        raise SpecError(f"model {spec.spec!r} for input {tuple(spec.in_shape)}: {exc}") from exc
    if spec.fewbit_backward:
        from gia_bench.fewbit import replace_activations

        if replace_activations(model, spec.fewbit_backward) == 0:
            raise SpecError(f"model {spec.spec!r}: --fewbit-backward needs activation modules, and it has none")
    if device is not None:
        model.to(device)
    model.train(spec.mode == "train")
    return model


def canonical_model_spec(model: nn.Module, spec: str) -> str:
    """The canonical spec of a built model: its name and every parameter it keeps (shape/classes aside)."""
    name = parse_spec(spec).name
    parts = []
    for p in describe_params(type(model)):
        if p.name in ("in_shape", "num_classes") or not hasattr(model, p.name):
            continue
        value = getattr(model, p.name)
        parts.append(f"{p.name}={str(value).lower() if isinstance(value, bool) else value}")
    return name + (":" + ",".join(parts) if parts else "")


def build_recorded(
    spec: ModelSpec, seed: int | None = None, device: torch.device | str | None = "cpu"
) -> tuple[nn.Module, ModelSpec]:
    """The model a record names (or will name), and its :class:`ModelSpec` canonicalised.

    Every writer of records (capture, the trainer, the federated simulation) builds its
    model here from the user's spec, so a record always carries the canonical spec with
    every parameter (``convnet`` -> ``convnet:width=64``); every reader (the receiver
    side) builds the recorded model here too. ``seed`` and ``device`` are
    :func:`build_model`'s: None leaves the initialisation (or the placement, e.g. under
    ``torch.device("meta")``) to the caller.
    """
    model = build_model(spec, seed=seed, device=device)
    return model, dataclasses.replace(spec, spec=canonical_model_spec(model, spec.spec))


@MODELS.register("lenet")
class LeNet(nn.Module):
    """DLG's LeNet (Zhu et al. 2019): 3 sigmoid convs of 12 channels, one linear layer.

    Args:
        init_range: weights and biases drawn from U(-init_range, init_range), 0.5 as in DLG.
    """

    def __init__(self, in_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
                 init_range: Annotated[float, LENET_INIT_RANGE] = 0.5):
        super().__init__()
        self.init_range = init_range
        c, h, w = in_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, 12, kernel_size=5, padding=5 // 2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=1),
            nn.Sigmoid(),
        )
        with torch.no_grad():
            features = self.body(torch.zeros(1, c, h, w)).numel()
        self.fc = nn.Linear(features, num_classes)
        for p in self.parameters():
            nn.init.uniform_(p, -init_range, init_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


@MODELS.register("convnet")
class ConvNet(nn.Module):
    """The ConvNet of Inverting Gradients (Geiping et al. 2020): 8 conv-BN-ReLU layers, 2 max-pools.

    As ``ConvNetBN`` in the authors' code (inversefed/nn/models.py): 3x3 max-pools
    after the 6th and 8th convolutions, so a 32x32 input ends at 3x3 and the linear
    layer sees 36 * width features.

    Args:
        width: channels of the first layer (later layers use 2x and 4x), 64 in the paper.
    """

    def __init__(self, in_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
                 width: Annotated[int, CONVNET_WIDTH] = 64):
        super().__init__()
        self.width = width
        c = in_shape[0]
        widths = [c, width, 2 * width, 2 * width, 4 * width, 4 * width, 4 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(8):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1), nn.BatchNorm2d(widths[i + 1]), nn.ReLU()]
            if i in (5, 7):
                layers.append(nn.MaxPool2d(3))
        self.body = nn.Sequential(*layers)
        with torch.no_grad():
            features = self.body.eval()(torch.zeros(1, *in_shape)).numel()
        self.body.train()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


@MODELS.register("resnet18")
class ResNet18(nn.Module):
    """torchvision ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool)."""

    def __init__(self, in_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10):
        super().__init__()
        net = torchvision.models.resnet18(num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@MODELS.register("mlp")
class MLP(nn.Module):
    """Fully connected ReLU network; its first layer admits exact analytic inversion.

    Args:
        hidden: units per hidden layer.
        depth: number of hidden layers (>= 1).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        hidden: Annotated[int, MLP_HIDDEN] = 256,
        depth: Annotated[int, MLP_DEPTH] = 1,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"mlp depth must be >= 1, got {depth}")
        self.hidden, self.depth = hidden, depth
        dims = [in_shape[0] * in_shape[1] * in_shape[2]] + [hidden] * depth
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

# Text models (gia_bench.text.models) register themselves here; transformers is imported when one is built.
import gia_bench.text.models  # noqa: E402,F401
