"""Multi-scale SSIM (Wang, Simoncelli & Bovik 2003, eq. 7) of two images in [0, 1].

MS-SSIM = l_M^{alpha_M} * prod_{j=1..M} cs_j^{beta_j}: the contrast-structure term
``cs_j`` (eq. 3-4 of the SSIM paper, with C3 = C2 / 2) at every scale j, and the
luminance term ``l_M`` only at the coarsest scale M. Between scales the image is
low-pass filtered and downsampled by 2 (a 2x2 mean, as the authors' MATLAB code
does). The paper's settings: M = 5, exponents beta = (0.0448, 0.2856, 0.3001,
0.2363, 0.1333) finest first with alpha_M = beta_M, Gaussian window 11 taps /
sigma 1.5, K1 = 0.01, K2 = 0.03, ``data_range = 1``; each map is averaged over
its *valid* positions (the window entirely inside the image).

**Small images.** Five scales need a side of 11 * 2^4 = 176 px; ours are 16-32 px.
We use the largest M <= 5 for which the window still fits inside the coarsest
scale (side // 2^(M-1) >= window) and the first M exponents renormalised to sum
to 1 (so identical images still give 1 and the value stays in [0, 1]); M is
returned beside the value and recorded in the result. A 32 px image gets M = 2,
a 16-31 px image M = 1: mean(l) * mean(cs), close to but not equal to SSIM's
mean(l * cs) (eq. 7 averages each term over its map separately). Images under 11 px use the smaller window of
:func:`gia_bench.metrics.ssim_window` (the rule SSIM uses) and one scale.

Colour images: the mean over channels of each channel's MS-SSIM, as SSIM does.
A negative ``cs_j`` (anti-correlated structure) is clamped to 0 before the
fractional power, so the value stays real: such a pair scores 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Wang et al. 2003, section 3.1: exponents from the psychophysical calibration, finest scale first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
K1, K2 = 0.01, 0.03


def ms_ssim_scales(height: int, width: int, window: int) -> int:
    """How many scales (<= 5) keep the ``window`` inside the coarsest image: see the module docstring."""
    side = min(height, width)
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and side // 2**scales >= window:
        scales += 1
    return scales


def _gaussian(window: int, sigma: float) -> Tensor:
    r = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian over the valid positions of (N, 1, H, W) ``x``."""
    x = F.conv2d(x, g.reshape(1, 1, -1, 1))
    return F.conv2d(x, g.reshape(1, 1, 1, -1))


def _luminance_cs(x: Tensor, y: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Mean luminance term l and contrast-structure term cs over the valid map, per (N,) image."""
    c1, c2 = K1**2, K2**2  # data_range 1
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    # population (co)variances, as SSIM here uses (use_sample_covariance=False)
    sxx = _filter(x * x, g) - mu_x**2
    syy = _filter(y * y, g) - mu_y**2
    sxy = _filter(x * y, g) - mu_x * mu_y
    lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    return lum.mean(dim=(1, 2, 3)), cs.mean(dim=(1, 2, 3))


def ms_ssim_value(a01: Tensor, b01: Tensor, window: int, sigma: float) -> tuple[float, int]:
    """(MS-SSIM, number of scales used) of two (C, H, W) images in [0, 1]; inputs are not checked here."""
    x = a01.detach().to("cpu", torch.float64).unsqueeze(1)  # channels as a batch of gray images
    y = b01.detach().to("cpu", torch.float64).unsqueeze(1)
    scales = ms_ssim_scales(x.shape[-2], x.shape[-1], window)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    weights = weights / weights.sum()
    g = _gaussian(window, sigma)
    value = torch.ones(x.shape[0], dtype=torch.float64)
    for j in range(scales):
        lum, cs = _luminance_cs(x, y, g)
        value = value * cs.clamp(min=0.0) ** weights[j]
        if j == scales - 1:
            value = value * lum.clamp(min=0.0) ** weights[j]
        else:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return float(value.mean()), scales
