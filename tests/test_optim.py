"""QCMD / QRDA adagrad (Xu et al., TPAMI 2022; Duchi et al. 2011 closed forms) and their use in the trainer."""

from __future__ import annotations

import pytest
import torch

from gia_bench.errors import ConfigError
from gia_bench.optim import QCMDAdagrad, QRDAAdagrad, make_optimizer, sparsity


def _run(opt_cls, steps: int, **kw) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20))
    opt = opt_cls([w], **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        w.grad = torch.randn(20, generator=g)
        opt.step()
    return w.detach().clone()


def test_qcmd_without_l1_is_adagrad():
    ours = _run(QCMDAdagrad, 5, lr=0.3, l1=0.0, delta=1e-10)
    ref = _run(torch.optim.Adagrad, 5, lr=0.3, eps=1e-10)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_first_step_of_rda_equals_cmd_and_l1_gives_exact_zeros():
    torch.testing.assert_close(_run(QRDAAdagrad, 1, lr=0.1, l1=0.5), _run(QCMDAdagrad, 1, lr=0.1, l1=0.5))
    for cls in (QCMDAdagrad, QRDAAdagrad):
        dense, sparse = _run(cls, 30, lr=0.1, l1=0.0), _run(cls, 30, lr=0.1, l1=2.0)
        assert (sparse == 0).sum() > (dense == 0).sum() + 5


@pytest.mark.parametrize("cls", [QCMDAdagrad, QRDAAdagrad])
def test_lasso_solution_is_found_with_its_zeros(cls):
    # min 1/2 ||w - b||^2 + lam ||w||_1 has the solution soft(b, lam): zeros where |b| < lam
    b = torch.tensor([3.0, -2.0, 0.5, -0.3, 0.0, 1.5])
    lam = 1.0
    w = torch.nn.Parameter(torch.zeros(6))
    # dual averaging converges as O(1/sqrt(t)) (measured: 0.994 of the value at 1,000 steps with lr 5)
    lr, tol = (0.5, 2e-3) if cls is QCMDAdagrad else (5.0, 1e-2)
    opt = cls([w], lr=lr, l1=lam)
    for _ in range(3000):
        w.grad = w.detach() - b
        opt.step()
    expected = torch.sign(b) * torch.clamp(b.abs() - lam, min=0)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=tol)
    assert torch.equal(w.detach() == 0, expected == 0)


def test_rda_weights_each_gradient_by_its_own_learning_rate():
    """A decaying lr must not pull dual averaging back to its centre (the trainer's cosine decay)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    start = w.detach().clone()
    opt = QRDAAdagrad([w], lr=0.1, l1=0.0, delta=1e-10)
    grads = [torch.randn(5) for _ in range(3)]
    for eta, g in zip((0.1, 0.05, 1e-9), grads):
        opt.param_groups[0]["lr"] = eta
        w.grad = g
        opt.step()
    h = torch.sqrt(sum(g * g for g in grads)) + 1e-10
    torch.testing.assert_close(w.detach(), start - (0.1 * grads[0] + 0.05 * grads[1]) / h, rtol=1e-5, atol=1e-6)
    assert (w.detach() - start).abs().min() > 1e-3  # not back at the centre


def test_state_round_trips_and_bad_options_are_refused():
    w = torch.nn.Parameter(torch.randn(4))
    opt = QRDAAdagrad([w], lr=0.1, l1=0.1)
    w.grad = torch.ones(4)
    opt.step()
    again = QRDAAdagrad([w], lr=0.1, l1=0.1)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[w]["sum_eta_g"], opt.state[w]["sum_eta_g"])
    with pytest.raises(ConfigError, match="--l1"):
        make_optimizer("sgd", [w], lr=0.1, l1=0.1)
    with pytest.raises(ConfigError, match="--optimizer"):
        make_optimizer("adam", [w], lr=0.1)
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.zero_()
    assert sparsity(model) == pytest.approx(4 / 6)


def test_trainer_with_tq_and_qrda_adagrad_reports_sparsity(tmp_path):
    from gia_bench.train import TrainConfig, launch, load_checkpoint

    config = TrainConfig(
        out=tmp_path / "run", dataset="digits:size=8,channels=1", model="mlp:hidden=32", defense="tq:threshold=0.1,bits=4",
        nproc_per_node=2, epochs=1, batch_size=16, lr=0.05, max_steps_per_epoch=4, bucket_cap_mb=0.002, timeout_s=60,
        optimizer="qrda-adagrad", l1=0.05,
    )
    metrics = launch(config, fork=True)
    epoch = metrics["epochs"][0]
    assert 0.0 < epoch["sparsity"] < 1.0
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optimizer"]["state"]
    assert state and all("sum_sq" in s and "center" in s for s in state.values())
    with pytest.raises(ConfigError, match="--l1"):
        TrainConfig(out=tmp_path / "x", l1=0.1).validate()


def test_gia_bench_list_has_rows_for_the_optimizers_tq_and_few_bit_backward():
    """Issue 16: QCMD/QRDA adagrad (with tq) and Few-Bit Backward get rows in ``gia-bench list``."""
    from typer.testing import CliRunner

    from gia_bench import fewbit, optim
    from gia_bench.cli import app

    assert [row[0] for row in optim.listing()] == list(optim.OPTIMIZERS)
    assert [row[0] for row in fewbit.listing()] == ["fewbit"]
    runner = CliRunner()
    shown = {}
    for kind in ("optimizers", "backward", "defenses"):
        res = runner.invoke(app, ["list", kind], env={"COLUMNS": "240"})
        assert res.exit_code == 0, res.output
        shown[kind] = res.output
    assert all(name in shown["optimizers"] for name in ("sgd", "qcmd-adagrad", "qrda-adagrad", "--l1"))
    assert "fewbit" in shown["backward"] and "--fewbit-backward" in shown["backward"]
    assert "│ tq" in shown["defenses"] and "threshold" in shown["defenses"]
    everything = runner.invoke(app, ["list"], env={"COLUMNS": "240"}).output
    assert "qrda-adagrad" in everything and "fewbit" in everything
