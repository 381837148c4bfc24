"""ST-LPIPS: the shift-tolerant LPIPS of Ghildyal & Liu (ECCV 2022), from ``stlpips-pytorch``.

LPIPS (Zhang et al. 2018, eq. 1) on a trunk rebuilt to tolerate small shifts
(stride-1 first convolution, blur-pool downsampling, reflection padding), with its
own trained trunk *and* linear heads. Its values are **not comparable to
LPIPS-Alex**: different trunk weights, different calibration; so it is always
labelled "ST-LPIPS". What makes it our default perceptual distance: the wheel ships
every weight it needs (``stlpips_pytorch/weights/vST0.0/{alex,vgg}_shift_tolerant.pth``,
trunk and heads), so it works offline, where LPIPS proper needs torchvision's
ImageNet trunk file.

Loading offline. ``stlpips.LPIPS(pretrained=False, variant="shift_tolerant")``
builds the shift-tolerant trunk from scratch (that variant never calls torchvision's
``pretrained=True`` loaders, so nothing is downloaded) and loads no file; we then
read the shipped file ourselves with ``torch.load(weights_only=True)`` (the package
would unpickle it with ``strict=False``, so a missing key would go unnoticed) and
load each part strictly: ``net.*`` into the trunk, ``lin0..lin4.*`` into the heads,
``scaling_layer.*``; a key of the file that loads nowhere is an error too.

Undeclared imports. ``stlpips_pytorch`` imports ``IPython.embed`` (a leftover
debugging hook, in ``invariant_networks.py`` and ``models_lpf/downsample.py``) and
``torchsummary.summary`` (used only by its ``print_network`` helper), yet declares
neither. Neither is called on the scoring path, so when they are not installed we put
stub modules in ``sys.modules`` only while ``stlpips_pytorch`` is imported and remove
them afterwards; a stub raises if anything ever calls it. Installed packages are
never replaced.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from gia_bench.lazy_net import LazyNet, trunk_input

ST_LPIPS_NETS = ("alex", "vgg")
# Both shift-tolerant trunks need >= 32 px (at 16 px AlexNet's fourth stage is 1x1 and
# its reflection pad fails); smaller images are resized to this side, as LPIPS is.
ST_LPIPS_MIN_SIDE = 32
_UNDECLARED = {"IPython": "embed", "torchsummary": "summary"}


class STLPIPSUnavailable(Exception):
    """stlpips-pytorch cannot be imported, or its shipped weights do not load."""


@contextlib.contextmanager
def _undeclared_imports_stubbed() -> Iterator[None]:
    """Stub ``IPython`` / ``torchsummary`` in ``sys.modules`` for the duration of the import, if absent."""
    added: list[str] = []
    for name, attr in _UNDECLARED.items():
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        stub = types.ModuleType(name)

        def _absent(*args: Any, _name: str = name, **kwargs: Any) -> None:
            raise RuntimeError(f"{_name} is not installed (stlpips_pytorch imports it, gia-bench never calls it)")

        setattr(stub, attr, _absent)
        sys.modules[name] = stub
        added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _import_stlpips() -> types.ModuleType:
    try:
        with _undeclared_imports_stubbed():
            from stlpips_pytorch import stlpips
    except ImportError as exc:
        raise STLPIPSUnavailable(f"stlpips_pytorch cannot be imported ({exc}); pip install stlpips-pytorch") from None
    return stlpips


def shipped_weights(net: str) -> Path:
    """The weights file the stlpips-pytorch wheel ships for ``net`` (trunk and heads)."""
    if net not in ST_LPIPS_NETS:
        raise ValueError(f"ST-LPIPS net {net!r} is not supported; accepted: {', '.join(ST_LPIPS_NETS)}")
    return Path(_import_stlpips().__file__).parent / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"


def build_st_lpips(net: Literal["alex", "vgg"] = "alex") -> torch.nn.Module:
    """The ST-LPIPS network with every shipped weight loaded strictly, in eval mode, no gradients."""
    stlpips = _import_stlpips()
    path = shipped_weights(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision deprecation warnings from inside the package
        model = stlpips.LPIPS(pretrained=False, net=net, variant="shift_tolerant", verbose=False)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a broken install must not crash scoring: the metric is skipped with a reason
        raise STLPIPSUnavailable(f"cannot read {path} ({type(exc).__name__}: {exc})") from None
    parts = ("net", "scaling_layer", *(f"lin{k}" for k in range(len(model.chns))))
    used: set[str] = set()
    for part in parts:
        sub = {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
        try:
            getattr(model, part).load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise STLPIPSUnavailable(f"{path}: {part}.* does not fit the network ({exc})") from None
        used.update(f"{part}.{k}" for k in sub)
    if set(state) - used:
        raise STLPIPSUnavailable(f"{path}: keys that load nowhere: {sorted(set(state) - used)[:3]}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class STLPIPSScorer(LazyNet):
    """ST-LPIPS distances of image pairs; the network is built on first use, then kept.

    When stlpips-pytorch is missing or its weights do not load, :attr:`available` is
    False and :attr:`reason` says why ("ST-LPIPS unavailable: ..."); never a number
    from random weights.
    """

    def __init__(self, net: Literal["alex", "vgg"] = "alex") -> None:
        if net not in ST_LPIPS_NETS:
            raise ValueError(f"ST-LPIPS net {net!r} is not supported; accepted: {', '.join(ST_LPIPS_NETS)}")
        super().__init__()
        self.net = net

    unavailable_errors = (STLPIPSUnavailable,)

    def _build(self) -> torch.nn.Module:
        return build_st_lpips(self.net)  # type: ignore[arg-type]

    def _reason_for(self, exc: Exception) -> str:
        return f"ST-LPIPS unavailable: {exc}"

    @torch.no_grad()
    def __call__(self, a01: Tensor, b01: Tensor) -> Tensor:
        """ST-LPIPS of each pair in two (B, C, H, W) batches in [0, 1] (not checked here): a (B,) tensor.

        Gray images are repeated to 3 channels, images scaled to [-1, 1] (the package's
        convention), sides under 32 px resized (bilinear) to 32, as for LPIPS.
        """
        model = self._ensure()
        if model is None:
            raise STLPIPSUnavailable(self._reason or "ST-LPIPS unavailable")
        x, y = trunk_input(a01, ST_LPIPS_MIN_SIDE, "ST-LPIPS"), trunk_input(b01, ST_LPIPS_MIN_SIDE, "ST-LPIPS")
        model.to(x.device)
        return model(x, y).reshape(-1).cpu()


@functools.lru_cache(maxsize=2)
def get_st_lpips(net: Literal["alex", "vgg"] = "alex") -> STLPIPSScorer:
    """The ST-LPIPS scorer for ``net``, one per process (building it takes seconds)."""
    return STLPIPSScorer(net)
