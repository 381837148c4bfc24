"""How close a reconstruction is to the private batch: SSIM, PSNR, LPIPS, label accuracy.

Every metric works on images in [0, 1]: the model inputs denormalised with the
record's mean/std and clamped (``DatasetSpec.denormalize(x).clamp(0, 1)``). Nothing is
normalised behind the caller's back; values outside [0, 1] are an error.

* **SSIM** (Wang, Bovik, Sheikh & Simoncelli 2004, eq. 13): scikit-image's
  ``structural_similarity`` with the paper's settings, Gaussian window
  (sigma 1.5, 11 taps), population covariance, ``data_range=1``, averaged over
  colour channels. Images smaller than 11 px use the largest odd window that
  fits, with sigma = radius / 3.5 so the Gaussian keeps the same truncation.
* **PSNR** = 10 log10(1 / MSE) in dB; identical images give ``math.inf``.
* **LPIPS** (Zhang et al. 2018, eq. 1) with the ``lpips`` package's linear
  heads (v0.1) on an AlexNet (default) or VGG-16 trunk. The package ships only
  the heads; the trunk's ImageNet weights are read from a local file and never
  downloaded (:class:`LPIPSScorer`). Without that file the value is ``None``
  with a reason, never a number from random weights.
* **MS-SSIM** (Wang, Simoncelli & Bovik 2003): :mod:`gia_bench.msssim`; on our
  16-32 px images fewer than the paper's 5 scales fit, so the exponents of the
  scales used are renormalised, and the result records how many were used.
* **ST-LPIPS** (Ghildyal & Liu 2022): :mod:`gia_bench.st_lpips`; shift-tolerant
  LPIPS whose package ships all its weights, so it is the perceptual distance
  reports show when LPIPS has no trunk weights. Not comparable to LPIPS-Alex.
* **Registry**: :data:`METRICS` names every per-image metric with its direction,
  whether it needs weights, and its modality; :func:`score_batch` computes each
  one whose weights are there.
* **Batches**: an attack returns its B images in any order, so each
  reconstruction is paired with one original by the Hungarian algorithm
  (:func:`scipy.optimize.linear_sum_assignment`) on the pixel MSE between every
  pair before any metric is taken; label accuracy uses the same pairing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity
from torch import Tensor

from gia_bench.errors import GiaBenchError
from gia_bench.msssim import MS_SSIM_WEIGHTS, ms_ssim_scales, ms_ssim_value
from gia_bench.lazy_net import LazyNet, trunk_input
from gia_bench.st_lpips import get_st_lpips

LPIPS_WEIGHTS_ENV = "GIA_BENCH_LPIPS_WEIGHTS"
# torchvision's file names for the ImageNet trunks the lpips package was calibrated on
TRUNK_FILES: dict[str, str] = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_TRUNK_NAMES = {"alex": "AlexNet", "vgg": "VGG-16"}
# The AlexNet trunk needs at least 31 px (conv 11/4 then two 3/2 max-pools); smaller
# images are resized (bilinear) to this side before LPIPS. VGG needs 16.
LPIPS_MIN_SIDE = 32
_RANGE_TOL = 1e-5


# -- images in [0, 1] ----------------------------------------------------------------------------


def _check_unit(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point image in [0, 1], got dtype {x.dtype}")
    if x.numel() and (not bool(torch.isfinite(x).all()) or x.min() < -_RANGE_TOL or x.max() > 1 + _RANGE_TOL):
        raise ValueError(
            f"{name}: values must lie in [0, 1] (denormalise and clamp first: DatasetSpec.denormalize(x).clamp(0, 1));"
            f" got [{float(x.min()):.4g}, {float(x.max()):.4g}]"
        )


def _pair_check(a01: Tensor, b01: Tensor, ndim: int) -> None:
    if a01.dim() != ndim or a01.shape != b01.shape:
        want = "(C, H, W)" if ndim == 3 else "(B, C, H, W)"
        raise ValueError(f"expected two images of the same shape {want}, got {tuple(a01.shape)} and {tuple(b01.shape)}")
    _check_unit("first image", a01)
    _check_unit("second image", b01)


def _hwc(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).clamp(0.0, 1.0).permute(1, 2, 0).numpy()


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """(window side, Gaussian sigma) for an image of this size: 11 and 1.5 when it fits (Wang et al. 2004)."""
    side = min(height, width)
    if side >= 11:
        return 11, 1.5
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width}")
    win = side if side % 2 == 1 else side - 1
    # same truncation as the 11-tap window: radius = int(3.5 * sigma + 0.5)
    return win, (win - 1) / 2 / 3.5


def ssim(a01: Tensor, b01: Tensor) -> float:
    """SSIM of two (C, H, W) images in [0, 1] (Wang et al. 2004, eq. 13; mean over channels).

    scikit-image's ``structural_similarity`` with ``gaussian_weights=True``, sigma 1.5,
    ``use_sample_covariance=False``, ``data_range=1``: the paper's settings.
    """
    _pair_check(a01, b01, 3)
    win, sigma = ssim_window(a01.shape[1], a01.shape[2])
    a, b = _hwc(a01), _hwc(b01)
    colour = a.shape[2] > 1
    # SSIM lies in [-1, 1]; floating-point round-off can step past 1 by an ulp on identical images
    return min(1.0, max(-1.0, float(
        structural_similarity(
            a if colour else a[..., 0],
            b if colour else b[..., 0],
            win_size=win,
            sigma=sigma,
            gaussian_weights=True,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=2 if colour else None,
        )
    )))


def psnr(a01: Tensor, b01: Tensor) -> float:
    """PSNR in dB of two images in [0, 1]: 10 log10(1 / MSE); ``math.inf`` when they are identical."""
    if a01.shape != b01.shape:
        raise ValueError(f"expected two images of the same shape, got {tuple(a01.shape)} and {tuple(b01.shape)}")
    _check_unit("first image", a01)
    _check_unit("second image", b01)
    diff = a01.detach().to("cpu", torch.float64).clamp(0, 1) - b01.detach().to("cpu", torch.float64).clamp(0, 1)
    mse = float(diff.pow(2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(1.0 / mse)


def ms_ssim(a01: Tensor, b01: Tensor) -> float:
    """MS-SSIM of two (C, H, W) images in [0, 1] (Wang et al. 2003; :mod:`gia_bench.msssim`).

    Paper settings (5 scales, window 11 / sigma 1.5) where the image is large enough;
    on smaller images the scales that fit, with renormalised exponents
    (:func:`ms_ssim_note` says how many). Mean over colour channels.
    """
    _pair_check(a01, b01, 3)
    win, sigma = ssim_window(a01.shape[1], a01.shape[2])
    return ms_ssim_value(a01, b01, win, sigma)[0]


def ms_ssim_note(shape: tuple[int, ...]) -> str | None:
    """Says how many scales MS-SSIM used on (..., H, W) images when it is fewer than the paper's 5."""
    h, w = shape[-2], shape[-1]
    win, _ = ssim_window(h, w)
    scales = ms_ssim_scales(h, w, win)
    if scales == len(MS_SSIM_WEIGHTS):
        return None
    return (
        f"MS-SSIM on {h}x{w} px images: {scales} of {len(MS_SSIM_WEIGHTS)} scales (window {win} must fit the"
        f" coarsest), exponents {MS_SSIM_WEIGHTS[:scales]} renormalised to sum 1"
    )


def mean_colour_floor(original01: Tensor) -> list[tuple[float, float]]:
    """(SSIM, PSNR) of a flat image of each original's mean colour against that original.

    The score an attacker gets for knowing nothing but the average colour; reported
    beside every table because PSNR alone flatters weak reconstructions.
    """
    if original01.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) originals, got {tuple(original01.shape)}")
    out = []
    for img in original01:
        flat = img.mean(dim=(1, 2), keepdim=True).expand_as(img).clone()
        out.append((ssim(flat, img), psnr(flat, img)))
    return out


# -- LPIPS -----------------------------------------------------------------------------------------


class _Unavailable(Exception):
    pass


def lpips_weights_path(net: str = "alex", weights: Path | str | None = None) -> tuple[Path, str]:
    """Where the trunk weights come from: explicit path > $GIA_BENCH_LPIPS_WEIGHTS > torchvision's cache.

    Returns the path and a few words saying which source it is (for messages).
    """
    if net not in TRUNK_FILES:
        raise GiaBenchError(f"LPIPS net {net!r} is not supported; accepted: {', '.join(TRUNK_FILES)}")
    if weights is not None:
        return Path(weights).expanduser(), "given path"
    env = os.environ.get(LPIPS_WEIGHTS_ENV)
    if env:
        return Path(env).expanduser(), f"${LPIPS_WEIGHTS_ENV}"
    return Path(torch.hub.get_dir()) / "checkpoints" / TRUNK_FILES[net], "torchvision's cache"


def _load_state(path: Path) -> dict[str, Tensor]:
    """A state dict from a safetensors file or a torch.save file (never unpickling objects)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    return state


class LPIPSScorer(LazyNet):
    """LPIPS (Zhang et al. 2018) with a trunk whose ImageNet weights come from a local file.

    ``lpips.LPIPS(pretrained=True)`` would have torchvision download the trunk; here the
    network is built with a random trunk (``pnet_rand=True``, nothing fetched), the
    lpips package's own v0.1 linear heads are loaded, and the trunk is overwritten with
    the ``features.*`` tensors of torchvision's ``alexnet`` / ``vgg16`` state dict read
    from the weights file. The file is validated (loads without unpickling objects,
    every trunk tensor present with the right shape, finite); otherwise
    :attr:`available` is False and :attr:`reason` names the file and how to fix it.
    Built lazily, on first use.
    """

    unavailable_errors = (_Unavailable,)

    def __init__(self, net: Literal["alex", "vgg"] = "alex", weights: Path | str | None = None) -> None:
        super().__init__()
        self.net = net
        self.weights_path, self.source = lpips_weights_path(net, weights)

    def _how(self) -> str:
        return (
            f"put torchvision's {TRUNK_FILES[self.net]} (the ImageNet {_TRUNK_NAMES[self.net]}) in"
            f" {Path(torch.hub.get_dir()) / 'checkpoints'}, or pass --lpips-weights PATH"
            f" / set {LPIPS_WEIGHTS_ENV}=PATH"
        )

    def _build(self) -> torch.nn.Module:
        try:
            import lpips
        except ImportError as exc:  # a declared dependency, but a broken environment must not crash a report
            raise _Unavailable(f"the lpips package cannot be imported ({exc}); pip install lpips") from None

        path = self.weights_path
        if not path.is_file():
            raise _Unavailable(f"no {_TRUNK_NAMES[self.net]} trunk weights at {path} ({self.source})")
        try:
            state = _load_state(path)
        except Exception as exc:  # any failure to read is reported, the report goes on without LPIPS
            raise _Unavailable(f"cannot read trunk weights {path} ({type(exc).__name__}: {exc})") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation, from inside lpips
            model = lpips.LPIPS(pretrained=False, net=self.net, pnet_rand=True, verbose=False)
        heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{self.net}.pth"
        head_state = torch.load(heads, map_location="cpu", weights_only=True)
        missing_heads = [k for k in head_state if k not in model.state_dict()]
        if missing_heads:
            raise _Unavailable(f"the lpips package's heads {heads} do not fit ({missing_heads[:3]})")
        model.load_state_dict(head_state, strict=False)
        # lpips names trunk layers net.slice<k>.<i>.*, keeping torchvision's index i in .features
        trunk = model.net.state_dict()
        new: dict[str, Tensor] = {}
        problems: list[str] = []
        for key, ref in trunk.items():
            _, index, leaf = key.split(".", 2)
            src = f"features.{index}.{leaf}"
            t = state.get(src)
            if t is None:
                problems.append(f"{src} missing")
            elif tuple(t.shape) != tuple(ref.shape):
                problems.append(f"{src} is {tuple(t.shape)}, needs {tuple(ref.shape)}")
            elif not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                problems.append(f"{src} is not finite floating point")
            else:
                new[key] = t.to(ref.dtype)
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise _Unavailable(
                f"{path} is not a torchvision {_TRUNK_NAMES[self.net]} state dict: {'; '.join(problems[:3])}{more}"
            )
        model.net.load_state_dict(new, strict=True)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def _reason_for(self, exc: Exception) -> str:
        return f"LPIPS unavailable: {exc}; {self._how()}"

    @torch.no_grad()
    def __call__(self, a01: Tensor, b01: Tensor) -> Tensor:
        """LPIPS distance of each pair in two (B, C, H, W) batches in [0, 1]: a (B,) tensor.

        Gray images are repeated to 3 channels; images are scaled to [-1, 1] (lpips'
        convention); sides under 32 px are resized (bilinear) to 32 so the trunk fits.
        """
        model = self._ensure()
        if model is None:
            raise GiaBenchError(self._reason or "LPIPS unavailable")
        _pair_check(a01, b01, 4)
        x, y = trunk_input(a01, LPIPS_MIN_SIDE, "LPIPS"), trunk_input(b01, LPIPS_MIN_SIDE, "LPIPS")
        model.to(x.device)
        return model(x, y).reshape(-1).cpu()


@functools.lru_cache(maxsize=8)
def _cached_scorer(net: str, path: str) -> LPIPSScorer:
    return LPIPSScorer(net, Path(path))  # type: ignore[arg-type]


def get_lpips(net: str = "alex", weights: Path | None = None) -> LPIPSScorer:
    """The LPIPS scorer for ``net`` ("alex" or "vgg"), cached per (net, resolved weights file)."""
    path, source = lpips_weights_path(net, weights)
    scorer = _cached_scorer(net, str(path))
    scorer.source = source
    return scorer


# -- the metric registry ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Metric:
    """One per-image metric: how to compute it on paired batches and how to read it."""

    name: str  # key in result.json
    label: str  # column heading in reports
    # paired (B, C, H, W) batches in [0, 1] -> one value per pair
    function: Callable[[Tensor, Tensor], list[float]]
    direction: Literal["higher", "lower"]  # which way means a closer reconstruction (more leakage)
    needs_weights: bool  # a trained network whose weights may be missing
    modality: Literal["image", "text"]
    description: str
    # why it cannot be computed in this environment ("... unavailable: ..."), None when it can
    unavailable: Callable[[], str | None] = lambda: None
    # what a reader must know about the values on images of this shape, e.g. scales used
    note: Callable[[tuple[int, ...]], str | None] = lambda shape: None


def _each(fn: Callable[[Tensor, Tensor], float]) -> Callable[[Tensor, Tensor], list[float]]:
    return lambda a, b: [fn(x, y) for x, y in zip(a, b)]


def _st_lpips(a01: Tensor, b01: Tensor) -> list[float]:
    return [float(v) for v in get_st_lpips("alex")(a01, b01)]


def _lpips(a01: Tensor, b01: Tensor) -> list[float]:
    return [float(v) for v in get_lpips()(a01, b01)]


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("psnr", "PSNR dB", _each(lambda a, b: psnr(a, b)), "higher", False, "image",
               "10 log10(1 / MSE) in dB; inf on identical images"),
        Metric("ssim", "SSIM", _each(lambda a, b: ssim(a, b)), "higher", False, "image",
               "SSIM (Wang et al. 2004), Gaussian window 11 / sigma 1.5, mean over channels"),
        Metric("ms_ssim", "MS-SSIM", _each(lambda a, b: ms_ssim(a, b)), "higher", False, "image",
               "multi-scale SSIM (Wang et al. 2003); fewer than 5 scales on small images, exponents renormalised",
               note=ms_ssim_note),
        Metric("st_lpips", "ST-LPIPS", _st_lpips, "lower", True, "image",
               "shift-tolerant LPIPS (Ghildyal & Liu 2022), AlexNet, weights shipped by stlpips-pytorch;"
               " not comparable to LPIPS-Alex",
               unavailable=lambda: get_st_lpips("alex").reason),
        Metric("lpips", "LPIPS", _lpips, "lower", True, "image",
               "LPIPS (Zhang et al. 2018) v0.1 heads; needs the ImageNet trunk file (--lpips-weights)",
               unavailable=lambda: get_lpips().reason),
    )
}
# Text metrics (ROUGE, token F1, exact, PII) score token batches, not images: gia_bench.text.metrics.
from gia_bench.text.metrics import text_metrics  # noqa: E402

METRICS.update({m.name: m for m in text_metrics()})


def listing() -> list[tuple[str, str, str]]:
    """(name, properties, description) of each registered metric, for ``gia-bench list metrics``."""
    rows = []
    for m in METRICS.values():
        props = f"{m.label}; {m.direction} is closer; {m.modality}" + ("; needs weights" if m.needs_weights else "")
        rows.append((m.name, props, m.description))
    return rows


# LPIPS is computed by the scorer the caller passes (its trunk file may be missing); every other
# registered metric by its own function
_SCORER_METRIC = "lpips"


# -- batches ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageScores:
    """One original image and the reconstruction paired to it, scored by every registered metric."""

    index: int  # position in the original batch
    matched: int  # position of the paired reconstruction
    # :data:`METRICS` name -> value; None where not computed (weights missing)
    values: Mapping[str, float | None] = dataclasses.field(default_factory=dict)

    def value(self, name: str) -> float | None:
        """The score of metric ``name`` (a :data:`METRICS` key); None when not computed."""
        return self.values.get(name)

    @property
    def ssim(self) -> float:
        return self.values["ssim"]  # type: ignore[return-value]  # always computed

    @property
    def psnr(self) -> float:  # may be math.inf
        return self.values["psnr"]  # type: ignore[return-value]

    @property
    def lpips(self) -> float | None:
        return self.values.get("lpips")

    def to_json(self) -> dict[str, Any]:
        """One flat dict: index, matched, then each metric's value under its name."""
        return {"index": self.index, "matched": self.matched, **self.values}


@dataclasses.dataclass(frozen=True)
class BatchScores:
    """Scores of a reconstructed batch, one entry per original image, after Hungarian pairing."""

    images: tuple[ImageScores, ...]
    label_accuracy: float | None  # after the same pairing; None if labels not given
    lpips_reason: str | None  # why LPIPS is None ("LPIPS unavailable: ...")
    # why another registered metric is None, by name ("ST-LPIPS unavailable: ...")
    unavailable: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # what to know about a metric's values here, by name (e.g. MS-SSIM's scales on small images)
    notes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; an infinite PSNR stays float inf (``json.dump`` writes ``Infinity``)."""
        return {
            "images": [im.to_json() for im in self.images],
            "label_accuracy": self.label_accuracy,
            "lpips_reason": self.lpips_reason,
            "unavailable": dict(self.unavailable),
            "notes": dict(self.notes),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchScores:
        """What :meth:`to_json` wrote; each image's registered metrics by name (others are ignored).

        Trusts its input; :meth:`gia_bench.results.AttackResult.from_json` checks a file first.
        """
        images = tuple(
            ImageScores(int(d["index"]), int(d["matched"]),
                        {k: None if d[k] is None else float(d[k]) for k in METRICS if k in d})  # fmt: skip
            for d in data["images"]
        )
        acc = data.get("label_accuracy")
        return cls(
            images, None if acc is None else float(acc), data.get("lpips_reason"),
            dict(data.get("unavailable") or {}), dict(data.get("notes") or {}),
        )

    @property
    def matching(self) -> tuple[int, ...]:
        """``matching[i]``: the reconstruction paired to original ``i``."""
        return tuple(im.matched for im in self.images)


def pair_images(reconstruction01: Tensor, original01: Tensor) -> tuple[int, ...]:
    """Hungarian pairing: for each original, the reconstruction that minimises the total pixel MSE.

    Cost of pairing original i with reconstruction j: mean squared pixel difference.
    Returns ``matched`` with ``matched[i]`` the reconstruction index paired to original i.
    There may be more reconstructions than originals (the extra ones stay unpaired).
    """
    n_rec, n_orig = reconstruction01.shape[0], original01.shape[0]
    if reconstruction01.shape[1:] != original01.shape[1:]:
        raise ValueError(
            f"reconstruction images {tuple(reconstruction01.shape[1:])} and originals"
            f" {tuple(original01.shape[1:])} differ in shape"
        )
    if n_rec < n_orig:
        raise ValueError(f"{n_rec} reconstructions cannot be paired with {n_orig} originals")
    o = original01.detach().to("cpu", torch.float64).reshape(n_orig, -1)
    r = reconstruction01.detach().to("cpu", torch.float64).reshape(n_rec, -1)
    cost = torch.cdist(o, r).pow(2) / o.shape[1]
    rows, cols = linear_sum_assignment(cost.numpy())
    matched = [0] * n_orig
    for i, j in zip(rows.tolist(), cols.tolist()):
        matched[i] = j
    return tuple(matched)


def score_batch(
    reconstruction01: Tensor,
    original01: Tensor,
    rec_labels: Tensor | None = None,
    true_labels: Tensor | None = None,
    lpips: LPIPSScorer | None = None,
    *,
    compute_lpips: bool = True,
) -> BatchScores:
    """Pair reconstructions to originals (Hungarian on pixel MSE, :func:`pair_images`), then score each pair.

    Both batches are (B, C, H, W) in [0, 1]. ``lpips`` defaults to :func:`get_lpips` ()
    (AlexNet, weights from $GIA_BENCH_LPIPS_WEIGHTS or torchvision's cache); when it is
    unavailable, or ``compute_lpips`` is False, every LPIPS value is None and
    ``lpips_reason`` says why. Every other registered metric (:data:`METRICS`) whose
    weights are there is computed too; one that is not gets None and its reason in
    ``unavailable``. Label accuracy compares ``rec_labels[matched[i]]`` with
    ``true_labels[i]``; None unless both are given.
    """
    if reconstruction01.dim() != 4 or original01.dim() != 4:
        raise ValueError(
            f"expected (B, C, H, W) batches, got {tuple(reconstruction01.shape)} and {tuple(original01.shape)}"
        )
    _check_unit("reconstruction", reconstruction01)
    _check_unit("original", original01)
    matched = pair_images(reconstruction01, original01)
    paired = reconstruction01.detach()[list(matched)]
    orig = original01.detach()

    lpips_values: list[float | None] = [None] * len(matched)
    reason: str | None
    if not compute_lpips:
        reason = "LPIPS not computed (turned off)"
    else:
        scorer = lpips if lpips is not None else get_lpips()
        reason = scorer.reason
        if scorer.available:
            lpips_values = [float(v) for v in scorer(paired, orig)]

    values: dict[str, list[float | None]] = {}
    unavailable: dict[str, str] = {}
    notes: dict[str, str] = {}
    for metric in METRICS.values():
        if metric.modality != "image":  # text metrics score token ids (gia_bench.text.metrics), not images
            continue
        if metric.name == _SCORER_METRIC:
            values[metric.name] = lpips_values
            continue
        why = metric.unavailable()
        if why is not None:
            unavailable[metric.name] = why
            values[metric.name] = [None] * len(matched)
        else:
            values[metric.name] = list(metric.function(paired, orig))
        note = metric.note(tuple(orig.shape))
        if note is not None:
            notes[metric.name] = note

    label_acc: float | None = None
    if rec_labels is not None and true_labels is not None:
        rec_l = rec_labels.detach().reshape(-1).cpu()
        true_l = true_labels.detach().reshape(-1).cpu()
        if rec_l.numel() < reconstruction01.shape[0] or true_l.numel() != orig.shape[0]:
            raise ValueError(
                f"{rec_l.numel()} inferred labels / {true_l.numel()} true labels for"
                f" {reconstruction01.shape[0]} reconstructions / {orig.shape[0]} originals"
            )
        label_acc = float((rec_l[list(matched)] == true_l).double().mean())

    images = tuple(
        ImageScores(i, j, {name: column[i] for name, column in values.items()}) for i, j in enumerate(matched)
    )
    return BatchScores(images, label_acc, reason, unavailable, notes)
