"""Dummy inputs for the strategies that simulate the model: Gaussian noise of a chosen spectrum."""

from __future__ import annotations

import torch


SPECTRA = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
"""Exponents of the dummies' amplitude spectrum 1/f^e that ``spectrum=auto`` chooses among (0: white)."""


def coloured_noise(
    n: int,
    shape: tuple[int, int, int],
    exponent: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    chroma: float = 0.3,
) -> torch.Tensor:
    """``n`` Gaussian images of ``shape`` whose amplitude spectrum falls as 1/f^``exponent``.

    Exponent 0 is white noise; natural photographs fall as about 1/f (Field 1987) and
    smaller or upsampled images faster. Colour images are one shared (luminance) field
    plus ``chroma`` times an independent field per channel, since a photograph's channels are
    strongly correlated. Each channel is standardised over the batch (zero mean, unit
    variance), as data sets normalise theirs, so only the spatial and colour structure differs
    from N(0, 1) dummies.
    """
    return colour(white_fields(n, shape, generator, device), exponent, chroma)


def white_fields(
    n: int, shape: tuple[int, int, int], generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The N(0, 1) fields that :func:`colour` turns into ``n`` images of ``shape``: one per
    channel for gray images, a luminance field plus one per channel for colour ones."""
    c, h, w = shape
    return torch.randn((n, c if c == 1 else c + 1, h, w), generator=generator, device=device)


def colour(white: torch.Tensor, exponent: float, chroma: float = 0.3) -> torch.Tensor:
    """:func:`coloured_noise` from its white fields ``white`` (n, 1 or 1 + channels, h, w).

    The same fields coloured with different exponents give dummies that differ only by the
    spectrum (common random numbers), so ``spectrum=auto`` compares exponents, not draws.
    """
    h, w = white.shape[-2:]
    if exponent != 0:
        freq = torch.fft.fftfreq(h, device=white.device)[:, None] ** 2 + torch.fft.fftfreq(w, device=white.device) ** 2
        f = freq.sqrt()
        f[0, 0] = 1.0 / max(h, w)  # the mean: as strong as the lowest frequency
        white = torch.fft.ifft2(torch.fft.fft2(white) / f**exponent).real
    x = white if white.shape[1] == 1 else white[:, :1] + chroma * white[:, 1:]
    return (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)
