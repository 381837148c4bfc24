"""Test gradients and the error-feedback conservation assertion shared by the compressor tests.

The gradients and the check itself live in :mod:`gia_bench.contract` (the battery that
``gia-bench audit`` runs too); this module keeps the names the tests import.
"""

from __future__ import annotations

from gia_bench.contract import BATTERY_SHAPES, battery_grads, edge_grads, error_feedback_gap

__all__ = ["BATTERY_SHAPES", "assert_error_feedback_conserves", "battery_grads", "edge_grads"]


def assert_error_feedback_conserves(comp, grad_steps, rtol: float = 1e-5) -> dict:
    """Run ``comp`` (one worker) over the gradient lists in ``grad_steps`` and assert
    ``sum_t output_t + e_T == sum_t g_t`` per tensor (error feedback delays, never drops;
    a tensor without a residual is one the compressor sends exactly). Returns the residuals."""
    reason = error_feedback_gap(comp, grad_steps, rtol)
    assert reason == "", f"{comp.spec}: {reason}"
    return comp.state_dict()["residuals"]
