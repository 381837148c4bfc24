import math

import pytest
import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import create
from gia_bench.defenses.noise import GaussianNoise
from gia_bench.errors import SpecError


def test_noise_has_the_right_std_and_zero_mean(gen):
    n = 200_000
    g = torch.zeros(n)
    g[0] = 0.5  # norm below the clip: kept as is
    for sigma, clip in [(0.01, 1.0), (0.3, 2.0), (0.05, 0.0)]:
        comp = GaussianNoise(sigma=sigma, clip=clip, seed=1)
        noise = comp.step([g], LocalCommunicator())[0] - g
        std = sigma * clip if clip > 0 else sigma
        # sample std has standard error std / sqrt(2n); the mean std / sqrt(n)
        assert abs(float(noise.std()) - std) < 5 * std / math.sqrt(2 * n)
        assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)


def test_clipping_to_the_global_norm(gen):
    grads = [torch.randn(30, 4, generator=gen), torch.randn(9, generator=gen)]
    norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))
    clip = norm / 4
    out = GaussianNoise(sigma=0.0, clip=clip).step(grads, LocalCommunicator())
    out_norm = float(torch.linalg.vector_norm(torch.cat([o.reshape(-1) for o in out])))
    assert math.isclose(out_norm, clip, rel_tol=1e-6)
    for g, o in zip(grads, out):  # same direction, every tensor scaled alike
        assert torch.allclose(o, g * (clip / norm), rtol=1e-5, atol=1e-7)
    # below the clip norm, or with clipping off, the gradient is untouched
    for c in [2 * norm, 0.0]:
        same = GaussianNoise(sigma=0.0, clip=c).step(grads, LocalCommunicator())
        assert all(torch.equal(a, b) for a, b in zip(same, grads))


def test_seed_rank_and_what_is_sent(gen):
    grads = [torch.randn(100, generator=gen)]
    comm = LocalCommunicator()
    a = GaussianNoise(seed=5).step(grads, comm)[0]
    b = GaussianNoise(seed=5).step(grads, LocalCommunicator())[0]
    rank1 = LocalCommunicator()
    rank1.rank = 1
    c = GaussianNoise(seed=5).step(grads, rank1)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    m = messages_by_tag(comm.messages)
    assert torch.equal(m["grads"], a) and comm.bytes_sent == 400


def test_simulate_clips_without_noise(gen):
    comp = GaussianNoise(sigma=0.1, clip=0.5)
    grads = [torch.randn(10, 10, generator=gen)]
    comm = LocalCommunicator()
    comp.step(grads, comm)
    msgs = messages_by_tag(comm.messages)
    cand = [grads[0].clone().requires_grad_(True)]
    sim = comp.simulate(cand, msgs)["grads"]
    assert math.isclose(float(torch.linalg.vector_norm(sim.detach())), 0.5, rel_tol=1e-6)
    obs = comp.message_values(msgs, [g.shape for g in grads])["grads"]
    # the observation is the simulation plus noise of std sigma * clip
    assert abs(float((obs - sim.detach()).std()) - 0.05) < 0.015
    sim.pow(2).sum().backward()
    assert torch.isfinite(cand[0].grad).all()


def test_bad_sigma():
    with pytest.raises(SpecError, match="sigma"):
        create("noise:sigma=-1")
