"""Metrics: SSIM/PSNR equal independent references, Hungarian pairing, LPIPS weights handling."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio

from gia_bench import metrics as M


def _pairs(gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Known pairs: colour and gray, big and tiny, noisy, blurred, unrelated."""
    out = []
    for c, h, w in ((3, 32, 32), (1, 25, 25), (3, 8, 8), (1, 16, 12)):
        a = torch.rand(c, h, w, generator=gen, dtype=torch.float64)
        noisy = (a + 0.1 * torch.randn(c, h, w, generator=gen, dtype=torch.float64)).clamp(0, 1)
        blurred = F.avg_pool2d(a[None], 3, stride=1, padding=1, count_include_pad=False)[0]
        other = torch.rand(c, h, w, generator=gen, dtype=torch.float64)
        out += [(a, noisy), (a, blurred), (a, other)]
    return out


def _ref_ssim(a: torch.Tensor, b: torch.Tensor, win: int, sigma: float) -> float:
    """Independent SSIM (Wang et al. 2004, eq. 13): Gaussian window, valid region, mean over channels."""
    r = (win - 1) // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g1 = torch.exp(-(x**2) / (2 * sigma**2))
    g1 = g1 / g1.sum()
    k = (g1[:, None] * g1[None, :])[None, None]
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(a.shape[0]):
        p, q = a[ch][None, None], b[ch][None, None]
        mu_p, mu_q = F.conv2d(p, k), F.conv2d(q, k)
        vp = F.conv2d(p * p, k) - mu_p**2
        vq = F.conv2d(q * q, k) - mu_q**2
        cov = F.conv2d(p * q, k) - mu_p * mu_q
        s = ((2 * mu_p * mu_q + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_q**2 + c1) * (vp + vq + c2))
        vals.append(float(s.mean()))
    return float(np.mean(vals))


def _paper_window(height: int, width: int) -> tuple[int, float]:
    """Wang et al. 2004's window, written here from the paper rather than taken from the code under test:
    11 taps with sigma 1.5; an image under 11 pixels gets the largest odd window that fits, with sigma
    shrunk so that the window still ends at the 11-tap window's truncation (radius = 3.5 sigma)."""
    side = min(height, width)
    if side >= 11:
        return 11, 1.5
    win = side if side % 2 == 1 else side - 1
    return win, (win - 1) / 2 / 3.5


def test_ssim_equals_an_independent_reference(gen: torch.Generator) -> None:
    for a, b in _pairs(gen):
        got = M.ssim(a, b)
        # the interior (cropped) SSIM map does not depend on the border mode: a plain convolution over
        # the valid region, with the paper's window and constants, must give the same number
        assert got == pytest.approx(_ref_ssim(a, b, *_paper_window(a.shape[1], a.shape[2])), abs=1e-9)
        assert got == pytest.approx(M.ssim(b, a), abs=1e-12)  # symmetric
        assert -1.0 <= got < 1.0
    a = _pairs(gen)[0][0]
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert M.ssim_window(32, 32) == (11, 1.5)  # Wang et al.'s 11-tap, sigma 1.5 window
    assert M.ssim_window(8, 8)[0] == 7


@pytest.mark.parametrize("p, q", [(0.5, 0.25), (0.9, 0.1), (0.02, 0.0), (0.3, 0.3)])
def test_ssim_of_two_flat_images_is_the_luminance_term(p: float, q: float) -> None:
    """Two flat images have no variance and no covariance: eq. 13 reduces to
    (2 p q + C1) / (p^2 + q^2 + C1) with C1 = (K1 L)^2, K1 = 0.01, L = 1 (the data range),
    whatever the window: a value computed by hand."""
    c1 = (0.01 * 1.0) ** 2
    want = (2 * p * q + c1) / (p * p + q * q + c1)
    for c, h, w in ((1, 16, 16), (3, 12, 20), (1, 8, 8)):
        a = torch.full((c, h, w), p, dtype=torch.float64)
        b = torch.full((c, h, w), q, dtype=torch.float64)
        assert M.ssim(a, b) == pytest.approx(want, abs=1e-9)


def test_psnr_equals_skimage_and_identical_is_inf(gen: torch.Generator) -> None:
    for a, b in _pairs(gen):
        ref = peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1.0)
        assert M.psnr(a, b) == pytest.approx(ref, abs=1e-9)
    a = torch.rand(3, 8, 8, generator=gen)
    assert M.psnr(a, a) == math.inf
    # a known value: uniform error of 0.1 -> MSE 0.01 -> 20 dB
    z = torch.zeros(1, 4, 4, dtype=torch.float64)
    assert M.psnr(z, z + 0.1) == pytest.approx(20.0, abs=1e-9)


def test_out_of_range_images_are_refused(gen: torch.Generator) -> None:
    a = torch.rand(3, 16, 16, generator=gen)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.ssim(a * 2 - 1, a)
    with pytest.raises(ValueError, match="to_unit"):
        M.psnr(a, a + 0.5)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalised = (a - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(M.to_unit(normalised, mean, std), a, atol=1e-6)
    assert float(M.to_unit(normalised * 10, mean, std).max()) <= 1.0


def test_pairing_recovers_a_shuffled_batch(gen: torch.Generator) -> None:
    x = torch.rand(8, 3, 16, 16, generator=gen)
    perm = torch.randperm(8, generator=gen)
    rec = (x[perm] + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    labels = torch.randint(0, 10, (8,), generator=gen)
    scores = M.score_batch(rec, x, labels[perm], labels, compute_lpips=False)
    # original i sits at the position where perm == i
    expected = tuple(int((perm == i).nonzero()) for i in range(8))
    assert scores.matching == expected
    assert scores.label_accuracy == 1.0
    assert [im.index for im in scores.images] == list(range(8))
    for im in scores.images:
        assert im.ssim == pytest.approx(M.ssim(rec[im.matched], x[im.index]))
        assert im.ssim > 0.9 and 24 < im.psnr < 28  # noise sigma 0.05 -> ~26 dB
    # without pairing the same batch scores far worse: the pairing is what found the images
    unpaired = [M.ssim(rec[i], x[i]) for i in range(8) if int(perm[i]) != i]
    assert max(unpaired) < 0.2
    # wrong labels after pairing count as wrong
    wrong = labels[perm].clone()
    wrong[expected[0]] = (wrong[expected[0]] + 1) % 10
    assert M.score_batch(rec, x, wrong, labels, compute_lpips=False).label_accuracy == pytest.approx(7 / 8)


def test_batch_scores_json_round_trip_keeps_inf(gen: torch.Generator) -> None:
    x = torch.rand(2, 1, 12, 12, generator=gen)
    scores = M.score_batch(x.clone(), x, compute_lpips=False)
    text = json.dumps(scores.to_json())
    assert "Infinity" in text
    back = M.BatchScores.from_json(json.loads(text))
    assert back == scores
    assert back.images[0].psnr == math.inf
    assert scores.label_accuracy is None and scores.lpips_reason is not None


def test_mean_colour_floor_matches_definition(gen: torch.Generator) -> None:
    x = torch.rand(3, 3, 16, 16, generator=gen)
    floors = M.mean_colour_floor(x)
    for img, (s, p) in zip(x, floors):
        flat = img.mean(dim=(1, 2), keepdim=True).expand_as(img)
        assert s == pytest.approx(M.ssim(flat, img)) and p == pytest.approx(M.psnr(flat, img))
        assert s < 0.1  # knowing the mean colour of noise says nothing about its structure


# -- LPIPS -----------------------------------------------------------------------------------------


def test_lpips_missing_weights_gives_null_and_reason(tmp_path: Path, gen: torch.Generator, monkeypatch) -> None:
    monkeypatch.delenv(M.LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty torchvision cache
    scorer = M.LPIPSScorer("alex")
    assert scorer.weights_path == tmp_path / "torch-home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert not scorer.available
    assert scorer.reason.startswith("LPIPS unavailable: ")
    assert str(scorer.weights_path) in scorer.reason and "--lpips-weights" in scorer.reason
    x = torch.rand(2, 3, 32, 32, generator=gen)
    scores = M.score_batch(x, x, lpips=scorer)
    assert all(im.lpips is None for im in scores.images)
    assert scores.lpips_reason == scorer.reason
    # the environment variable is the next source; a garbage file is refused with its name
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.setenv(M.LPIPS_WEIGHTS_ENV, str(bad))
    env_scorer = M.get_lpips("alex")
    assert env_scorer.weights_path == bad and not env_scorer.available
    assert str(bad) in env_scorer.reason


@pytest.fixture(scope="module")
def random_alexnet_trunk(tmp_path_factory) -> Path:
    """A torchvision AlexNet state dict with RANDOM weights: for exercising the code path only.

    Real LPIPS needs the ImageNet weights; numbers from this file mean nothing.
    Only the ``features.*`` tensors are saved (the trunk), which keeps the file small.
    """
    import torchvision

    net = torchvision.models.alexnet()
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k, v in net.features.state_dict().items():
        # redrawn from our own generator (He-style scale) so the file does not depend on global RNG state
        fan_in = v[0].numel() if v.dim() > 1 else 1
        state[f"features.{k}"] = torch.randn(v.shape, generator=gen) * (2.0 / fan_in) ** 0.5
    path = tmp_path_factory.mktemp("lpips") / "alexnet-random-test-only.pth"
    torch.save(state, path)
    return path


def test_lpips_real_code_path_with_test_only_weights(random_alexnet_trunk: Path, gen: torch.Generator) -> None:
    import lpips

    scorer = M.LPIPSScorer("alex", random_alexnet_trunk)
    assert scorer.available and scorer.reason is None
    x = torch.rand(3, 3, 32, 32, generator=gen)
    y = torch.rand(3, 3, 32, 32, generator=gen)
    d = scorer(x, y)
    assert d.shape == (3,) and bool((d > 0).all())
    assert torch.equal(scorer(x, x), torch.zeros(3))
    # reference: lpips' own construction (heads loaded by lpips) with the same trunk copied in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)
    trunk = torch.load(random_alexnet_trunk, weights_only=True)
    ref.net.load_state_dict({k: trunk[f"features.{k.split('.', 2)[1]}.{k.split('.', 2)[2]}"] for k in ref.net.state_dict()})
    with torch.no_grad():
        expected = ref(x, y, normalize=True).reshape(-1)
    assert torch.allclose(d, expected, atol=1e-6)
    # gray, small images: repeated to 3 channels and resized so the trunk fits
    g = torch.rand(2, 1, 25, 25, generator=gen)
    dg = scorer(g, g.flip(-1))
    assert dg.shape == (2,) and bool(torch.isfinite(dg).all())
    # score_batch fills LPIPS per paired image
    scores = M.score_batch(y.flip(0), x, lpips=scorer)
    assert scores.lpips_reason is None
    assert [im.lpips for im in scores.images] == pytest.approx(scorer(y.flip(0)[list(scores.matching)], x).tolist())


def test_lpips_wrong_architecture_is_refused(random_alexnet_trunk: Path) -> None:
    scorer = M.LPIPSScorer("vgg", random_alexnet_trunk)
    assert not scorer.available
    assert str(random_alexnet_trunk) in scorer.reason and "VGG-16" in scorer.reason
