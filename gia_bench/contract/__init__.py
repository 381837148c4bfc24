"""The compressor contract: one battery of checks for every compressor, built-in or plug-in.

pytest runs it on every registered compressor (``tests/defenses/test_all_compressors.py``,
parametrised by compressor and check) and ``gia-bench audit module:Class`` runs it on a
third party's compressor before ranking it (:mod:`gia_bench.audit`). Each check returns
the reason it failed, or ``""``; a check that does not apply to a compressor (error
feedback on one without residuals, CUDA without a device) raises :class:`NotApplicable`.

What a receiver, an attacker and a byte count rely on, and so what the battery checks:

* ``step`` returns one tensor per gradient with the gradient's shape, dtype and device,
  finite, also for all-zero, 0-d, one-entry and non-contiguous gradients and for none;
* every message is a CPU tensor whose bytes are counted (tags unique, ``nbytes`` the
  tensor's size), and something is sent;
* two fresh instances from the same spec compute the same thing (randomness comes from a
  ``torch.Generator`` seeded from the spec, saved in ``state_dict``);
* ``step`` leaves its input tensors untouched and returns new tensors, never the inputs;
* the output is what the counted messages carry: ``decode(messages, shapes, public)`` on
  a *fresh* instance rebuilt from the spec reproduces ``step``'s output, so nothing kept
  on the worker's instance reaches the receiver uncounted;
* the public state (:meth:`~gia_bench.defenses.base.Compressor.public_state`) is what the
  receiver knows before the step (the spec, the seeds, earlier messages): it never
  changes with the step's own gradient, which would let it carry that gradient for free;
* ``simulate`` and ``message_values`` agree in layout (the compressor-aware attack);
* ``state_dict`` / ``load_state_dict`` (through ``torch.save`` / ``torch.load(weights_only=True)``)
  resume bit-identically; error feedback delays, never drops
  (``sum_t output_t + e_T == sum_t g_t``);
* two workers over gloo compute the same aggregate, with ring byte counts.

One job a module: :mod:`~gia_bench.contract.base` (the battery's gradients, the subject, a
check and its result, shared helpers), :mod:`~gia_bench.contract.checks` (one instance),
:mod:`~gia_bench.contract.state` (across steps and devices), :mod:`~gia_bench.contract.gloo`
(two processes) and :mod:`~gia_bench.contract.battery` (the checks in order, and running them).
"""

from gia_bench.contract.base import (
    BATTERY_SHAPES,
    Check,
    CheckResult,
    NotApplicable,
    Subject,
    all_close,
    battery_grads,
    edge_grads,
    run_step,
)
from gia_bench.contract.battery import (
    CHECKS,
    CHECK_NAMES,
    GLOO_CHECK,
    check_compressor,
    failures,
    run_check,
)
from gia_bench.contract.checks import (
    check_awkward,
    check_bytes,
    check_decode,
    check_decode_fresh,
    check_deterministic,
    check_documented,
    check_empty,
    check_inputs_untouched,
    check_no_alias,
    check_shapes,
    check_spec,
    check_zeros,
    output_aliases,
)
from gia_bench.contract.gloo import (
    check_gloo,
    check_gloo_run,
    gloo_runs,
    ring_bytes,
)
from gia_bench.contract.state import (
    check_cuda,
    check_error_feedback,
    check_public_state,
    check_resume,
    check_simulate,
    error_feedback_gap,
    has_residuals,
)

__all__ = [
    "BATTERY_SHAPES",
    "CHECKS",
    "CHECK_NAMES",
    "Check",
    "CheckResult",
    "GLOO_CHECK",
    "NotApplicable",
    "Subject",
    "all_close",
    "battery_grads",
    "check_awkward",
    "check_bytes",
    "check_compressor",
    "check_cuda",
    "check_decode",
    "check_decode_fresh",
    "check_deterministic",
    "check_documented",
    "check_empty",
    "check_error_feedback",
    "check_gloo",
    "check_gloo_run",
    "check_inputs_untouched",
    "check_no_alias",
    "check_public_state",
    "check_resume",
    "check_shapes",
    "check_simulate",
    "check_spec",
    "check_zeros",
    "edge_grads",
    "error_feedback_gap",
    "failures",
    "gloo_runs",
    "has_residuals",
    "output_aliases",
    "ring_bytes",
    "run_check",
    "run_step",
]
