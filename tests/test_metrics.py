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
    with pytest.raises(ValueError, match="denormalise and clamp"):
        M.psnr(a, a + 0.5)


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


# -- MS-SSIM ---------------------------------------------------------------------------------------

_PAPER_BETA = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, section 3.1


def _ref_ms_ssim(a: np.ndarray, b: np.ndarray, scales: int) -> float:
    """Independent MS-SSIM of two 2-D float arrays (Wang et al. 2003, eq. 7), written from the paper
    with scipy: 11-tap Gaussian (sigma 1.5) over the valid region, 2x2 mean then keep every other
    pixel between scales, the first ``scales`` exponents renormalised."""
    from scipy.signal import correlate2d

    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    beta = np.array(_PAPER_BETA[:scales]) / sum(_PAPER_BETA[:scales])
    out = 1.0
    for j in range(scales):
        f = lambda z: correlate2d(z, w, mode="valid")  # noqa: E731
        mx, my = f(a), f(b)
        vx, vy, cxy = f(a * a) - mx**2, f(b * b) - my**2, f(a * b) - mx * my
        out *= max(float(np.mean((2 * cxy + c2) / (vx + vy + c2))), 0.0) ** beta[j]
        if j == scales - 1:
            out *= float(np.mean((2 * mx * my + c1) / (mx**2 + my**2 + c1))) ** beta[j]
        else:
            h, wd = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
            a = a[:h, :wd].reshape(h // 2, 2, wd // 2, 2).mean(axis=(1, 3))
            b = b[:h, :wd].reshape(h // 2, 2, wd // 2, 2).mean(axis=(1, 3))
    return out


def test_ms_ssim_equals_an_independent_reference_at_five_scales(gen: torch.Generator) -> None:
    a = torch.rand(1, 180, 190, generator=gen, dtype=torch.float64)
    a = F.avg_pool2d(a[None], 5, stride=1, padding=2, count_include_pad=False)[0]  # some structure at every scale
    for sigma in (0.05, 0.2):
        b = (a + sigma * torch.randn(a.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
        assert M.ms_ssim(a, b) == pytest.approx(_ref_ms_ssim(a[0].numpy(), b[0].numpy(), 5), abs=1e-9)
    assert M.ms_ssim_note((1, 180, 190)) is None  # 180 // 16 = 11: all five scales fit
    # 32 px: the window fits twice (32, 16), not at 8 px
    x = torch.rand(1, 32, 32, generator=gen, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    assert M.ms_ssim(x, y) == pytest.approx(_ref_ms_ssim(x[0].numpy(), y[0].numpy(), 2), abs=1e-9)
    assert "2 of 5 scales" in M.ms_ssim_note((3, 32, 32))


@pytest.mark.parametrize("p, q", [(0.5, 0.25), (0.9, 0.1)])
def test_ms_ssim_of_two_flat_images_by_hand(p: float, q: float) -> None:
    """Flat images: every cs_j is C2 / C2 = 1, so MS-SSIM is the luminance term raised to the coarsest
    scale's exponent (renormalised): 0.1333 / 1.0001 with five scales, 0.2856 / 0.3304 with two."""
    lum = (2 * p * q + 0.01**2) / (p**2 + q**2 + 0.01**2)
    big_p, big_q = torch.full((1, 176, 176), p, dtype=torch.float64), torch.full((1, 176, 176), q, dtype=torch.float64)
    assert M.ms_ssim(big_p, big_q) == pytest.approx(lum ** (0.1333 / 1.0001), abs=1e-12)
    small_p, small_q = big_p[:, :32, :32], big_q[:, :32, :32]
    assert M.ms_ssim(small_p, small_q) == pytest.approx(lum ** (0.2856 / (0.0448 + 0.2856)), abs=1e-12)


def test_ms_ssim_properties(gen: torch.Generator) -> None:
    for a, b in _pairs(gen):
        assert M.ms_ssim(a, a) == pytest.approx(1.0, abs=1e-12)
        assert M.ms_ssim(a, b) == pytest.approx(M.ms_ssim(b, a), abs=1e-12)  # symmetric
        assert 0.0 <= M.ms_ssim(a, b) < 1.0
        scales = {32: 2, 25: 2, 12: 1}.get(min(a.shape[1:]))  # how often the 11-px window fits, halving
        if scales is not None:  # one scale is mean(l) * mean(cs), not SSIM's mean(l * cs)
            ref = np.mean([_ref_ms_ssim(a[c].numpy(), b[c].numpy(), scales) for c in range(a.shape[0])])
            assert M.ms_ssim(a, b) == pytest.approx(ref, abs=1e-9)
    x = torch.rand(3, 32, 32, generator=gen, dtype=torch.float64)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    values = [M.ms_ssim(x, (x + s * noise).clamp(0, 1)) for s in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)]
    assert values[0] == 1.0 and all(u > v for u, v in zip(values, values[1:]))  # falls as noise grows


# -- ST-LPIPS --------------------------------------------------------------------------------------


def test_st_lpips_loads_every_shipped_weight_offline(monkeypatch) -> None:
    import socket
    import sys

    from gia_bench import st_lpips as S

    def no_network(*args, **kwargs):
        raise AssertionError("ST-LPIPS tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    model = S.build_st_lpips("alex")
    shipped = torch.load(S.shipped_weights("alex"), map_location="cpu", weights_only=True)
    assert sum(k.startswith("net.") for k in shipped) == 13  # 5 convs (weight, bias) + 3 blur filters
    state = model.state_dict()
    for key, value in shipped.items():  # each one loaded: the model holds exactly the shipped tensor
        assert torch.equal(state[key], value), key
    # the undeclared imports were stubbed only while importing, never left behind
    for name in ("IPython", "torchsummary"):
        mod = sys.modules.get(name)
        assert mod is None or getattr(mod, "__file__", None) is not None


def test_st_lpips_values() -> None:
    import skimage.data

    scorer = M.get_st_lpips("alex")
    assert scorer.available and scorer.reason is None
    photo = torch.tensor(skimage.data.astronaut(), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    photo = F.interpolate(photo, size=(32, 32), mode="area").clamp(0, 1)
    gray = torch.full_like(photo, 0.5)
    assert float(scorer(photo, photo)[0]) == 0.0
    flat = float(scorer(gray, photo)[0])
    assert flat > 1.0  # a flat image is far from a photo (1.24 measured with the shipped weights)
    assert float(scorer(photo, gray)[0]) == pytest.approx(flat, abs=1e-5)  # symmetric
    # noise moves it away from 0, less than a flat image does; gray 16 px images are resized and repeated
    g = torch.Generator().manual_seed(0)
    noisy = (photo + 0.05 * torch.randn(photo.shape, generator=g)).clamp(0, 1)
    assert 0.0 < float(scorer(noisy, photo)[0]) < flat
    small = photo.mean(dim=1, keepdim=True)[..., ::2, ::2]
    d = scorer(small, small.flip(-1))
    assert d.shape == (1,) and bool(torch.isfinite(d).all()) and float(d[0]) > 0


def test_registry_lists_the_metrics_and_score_batch_fills_each() -> None:
    images = [name for name, m in M.METRICS.items() if m.modality == "image"]
    assert images == ["psnr", "ssim", "ms_ssim", "st_lpips", "lpips"]
    # the text metrics (gia_bench.text.metrics) follow; score_batch, on images, leaves them out
    assert [name for name in M.METRICS if name not in images] == ["rouge1", "rouge2", "rougeL", "token_f1", "exact", "pii"]
    assert M.METRICS["st_lpips"].label == "ST-LPIPS" and M.METRICS["st_lpips"].direction == "lower"
    assert M.METRICS["ms_ssim"].direction == "higher" and not M.METRICS["ms_ssim"].needs_weights
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    scores = M.score_batch(y.flip(0), x, compute_lpips=False)
    for im in scores.images:
        paired = y.flip(0)[im.matched]
        assert im.value("ms_ssim") == M.ms_ssim(paired, x[im.index])
        assert im.value("st_lpips") == pytest.approx(float(M.get_st_lpips("alex")(paired[None], x[im.index][None])[0]))
        assert im.value("psnr") == im.psnr == M.psnr(paired, x[im.index])
    assert "2 of 5 scales" in scores.notes["ms_ssim"] and scores.unavailable == {}
    # round trip, and a result.json from before the registry (no ms_ssim / st_lpips) still reads
    assert M.BatchScores.from_json(json.loads(json.dumps(scores.to_json()))) == scores
    old = scores.to_json()
    old = {"images": [{k: d[k] for k in ("index", "matched", "ssim", "psnr", "lpips")} for d in old["images"]],
           "label_accuracy": None, "lpips_reason": old["lpips_reason"]}
    back = M.BatchScores.from_json(old)
    assert [im.psnr for im in back.images] == [im.psnr for im in scores.images]
    assert back.images[0].value("st_lpips") is None



def test_cli_lists_the_metrics() -> None:
    from typer.testing import CliRunner

    from gia_bench.cli import app

    res = CliRunner().invoke(app, ["list", "metrics"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip() for line in res.output.splitlines() if line.count("│") >= 3}
    assert {"psnr", "ssim", "ms_ssim", "st_lpips", "lpips"} <= rows
    assert "ST-LPIPS" in res.output and "not comparable to LPIPS-Alex" in res.output


def test_st_lpips_unavailable_gives_null_and_reason(monkeypatch) -> None:
    """A broken stlpips install: scoring goes on, ST-LPIPS is None with the reason, never a made-up number."""
    from gia_bench import st_lpips as S

    def broken(net: str) -> torch.nn.Module:
        raise S.STLPIPSUnavailable("stlpips_pytorch cannot be imported (test)")

    monkeypatch.setattr(S, "build_st_lpips", broken)
    scorer = S.STLPIPSScorer("alex")
    monkeypatch.setattr(M, "get_st_lpips", lambda net="alex": scorer)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    scores = M.score_batch(x, x, compute_lpips=False)
    assert [im.value("st_lpips") for im in scores.images] == [None, None]
    assert scores.unavailable == {"st_lpips": "ST-LPIPS unavailable: stlpips_pytorch cannot be imported (test)"}
    assert [im.value("ms_ssim") for im in scores.images] == [1.0, 1.0]  # the others are still computed
    with pytest.raises(S.STLPIPSUnavailable):
        scorer(x, x)


def test_ssim_stays_in_its_range_when_round_off_steps_past_one(monkeypatch):
    # a 168 dB reconstruction scored 1.0000000000000002, which the result's own reader then refused
    import gia_bench.metrics as metrics

    x = torch.rand((1, 8, 8), generator=torch.Generator().manual_seed(7))
    monkeypatch.setattr(metrics, "structural_similarity", lambda *a, **k: 1.0000000000000002)
    assert metrics.ssim(x, x) == 1.0
    monkeypatch.setattr(metrics, "structural_similarity", lambda *a, **k: -1.0000000000000002)
    assert metrics.ssim(x, 1 - x) == -1.0
