"""The checks across steps and devices: public state, simulate, resume, error feedback, CUDA."""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from typing import Any

import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses.base import Compressor
from gia_bench.contract.base import (
    BATTERY_SHAPES,
    NotApplicable,
    Subject,
    all_close,
    battery_grads,
    decode_step,
    output_problem,
    run_step,
    shapes_of,
)


def _public(comp: Compressor) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in comp.public_state().items()}


def check_public_state(s: Subject) -> str:
    """The public state after a step does not change with that step's gradient.

    It is what the receiver knows before the step: the spec, the seeds and what earlier
    messages carried (PowerSGD's warm-start Q, LAQ's stale copy). Two fresh instances with
    the same history and a different gradient at step ``t`` must report the same public
    state; otherwise it carries the step's gradient without a byte being counted.
    """
    for shared in (0, 2):  # the first step (spec and seeds only), then after two shared steps
        a, b = s.build(), s.build()
        for seed in range(shared):
            run_step(a, battery_grads(seed))
            run_step(b, battery_grads(seed))
        run_step(a, battery_grads(10))
        run_step(b, battery_grads(11))
        pa, pb = _public(a), _public(b)
        if sorted(pa) != sorted(pb):
            return f"public_state() keys change with the step's gradient ({sorted(pa)} vs {sorted(pb)})"
        for key in pa:
            if pa[key].shape != pb[key].shape or not torch.equal(pa[key], pb[key]):
                nbytes = pa[key].numel() * pa[key].element_size()
                return (
                    f"public_state()[{key!r}] after step {shared} changes with that step's gradient: the receiver"
                    f" cannot know it from the spec, the seeds and earlier messages, and its {nbytes} bytes are not"
                    " counted (send it as a message, or keep only public inputs there)"
                )
    return ""


def check_simulate(s: Subject) -> str:
    """``simulate`` gives the same float views as ``message_values``, differentiably where it claims to."""
    comp = s.build()
    if not comp.supports_simulate:
        return "cannot be attacked compressor-aware: implement simulate/message_values (supports_simulate = True)"
    grads = battery_grads(2)
    _, comm = run_step(comp, grads)
    messages = messages_by_tag(comm.messages)
    observed = comp.message_values(messages, shapes_of(grads), comp.public_state())
    candidate = [(g + 0.01).requires_grad_(True) for g in grads]
    simulated = comp.simulate(candidate, messages, comp.public_state())
    if not simulated or set(simulated) != set(observed):
        return f"simulate gives views {sorted(simulated)}, message_values {sorted(observed)}"
    for k in simulated:
        if simulated[k].shape != observed[k].shape:
            return f"simulate's {k!r} has shape {tuple(simulated[k].shape)}, message_values' {tuple(observed[k].shape)}"
    loss = sum(((simulated[k] - observed[k].to(simulated[k].dtype)) ** 2).sum() for k in simulated)
    if not bool(torch.isfinite(loss)):
        return "simulate or message_values gives NaN or inf values"
    if comp.differentiable_simulate:
        back = torch.autograd.grad(loss, candidate, allow_unused=True)
        if not any(b is not None and bool(b.abs().sum() > 0) for b in back):
            return "simulate carries no gradient (set differentiable_simulate = False if it cannot)"
        if not all(b is None or bool(torch.isfinite(b).all()) for b in back):
            return "the gradient through simulate has NaN or inf values"
    return ""


def _save_load(state: Any) -> Any:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def check_resume(s: Subject) -> str:
    """``state_dict`` (saved and loaded with ``weights_only=True``) resumes bit-identically."""
    comp = s.build()
    keys = [f"layer{i}" for i in range(len(BATTERY_SHAPES))]  # names, as the DDP hook passes them
    for seed in range(2):
        run_step(comp, battery_grads(seed), keys)
    try:
        # a remote compressor's state makes the round trip in its worker (it may hold what is not data)
        state = comp.state_round_trip() if s.remote is not None else _save_load(copy.deepcopy(comp.state_dict()))
    except Exception as exc:  # an unpicklable state is the finding
        kind = getattr(exc, "remote_type", type(exc).__name__)
        return f"state_dict does not survive torch.save / torch.load(weights_only=True): {kind}: {exc}"
    later = [battery_grads(seed) for seed in range(2, 5)]
    ref = [run_step(comp, g, keys) for g in later]
    resumed = s.build()
    resumed.load_state_dict(state)
    for t, (grads, (ref_out, ref_comm)) in enumerate(zip(later, ref)):
        out, comm = run_step(resumed, grads, keys)
        if not all(torch.equal(a, b) for a, b in zip(out, ref_out)):
            return f"after load_state_dict the outputs differ (step {t + 1} after resuming)"
        if [m.tag for m in comm.messages] != [m.tag for m in ref_comm.messages] or not all(
            torch.equal(a.tensor, b.tensor) for a, b in zip(comm.messages, ref_comm.messages)
        ):
            return f"after load_state_dict the messages differ (step {t + 1} after resuming)"
    return ""


def error_feedback_gap(comp: Compressor, grad_steps: Sequence[Sequence[torch.Tensor]], rtol: float = 1e-5) -> str:
    """Run ``comp`` (one worker) over ``grad_steps``; the reason ``sum_t output_t + e_T != sum_t g_t``, or "".

    A tensor without a residual is one the compressor sends exactly.
    """
    total_in: list[torch.Tensor] | None = None
    total_out: list[torch.Tensor] | None = None
    for grads in grad_steps:
        keys = list(range(len(grads)))
        out = comp.step([g.clone() for g in grads], LocalCommunicator(record=False), keys=keys)
        if total_in is None:
            total_in = [torch.zeros_like(g, dtype=torch.float64) for g in grads]
            total_out = [torch.zeros_like(g, dtype=torch.float64) for g in grads]
        for ti, to, g, o in zip(total_in, total_out, grads, out):
            ti += g.double()
            to += o.double()
    if total_in is None or total_out is None:
        raise ValueError("no steps given")
    residuals = comp.state_dict().get("residuals")
    if not isinstance(residuals, dict):
        return "state_dict() has no 'residuals' dict after a step"
    for i, (ti, to) in enumerate(zip(total_in, total_out)):
        e = residuals[i].double().reshape(ti.shape) if i in residuals else torch.zeros_like(ti)
        err = float(torch.linalg.vector_norm(to + e - ti))
        if err > rtol * float(torch.linalg.vector_norm(ti)):
            return (
                f"error feedback loses part of tensor {i}: |sum outputs + residual - sum gradients| = {err:.3g}"
                " (error feedback must delay, never drop)"
            )
    return ""


def has_residuals(comp: Compressor) -> bool:
    """Whether ``comp`` keeps error feedback under ``state_dict()["residuals"]`` after a step."""
    run_step(comp, battery_grads(0))
    return isinstance(comp.state_dict().get("residuals"), dict)


def check_error_feedback(s: Subject) -> str:
    """With error feedback (``state_dict()["residuals"]``), ``sum_t output_t + e_T == sum_t g_t``."""
    if not has_residuals(s.build()):
        raise NotApplicable("no error feedback: state_dict() holds no 'residuals'")
    return error_feedback_gap(s.build(), [battery_grads(seed) for seed in range(6)])


def check_cuda(s: Subject) -> str:
    """CUDA gradients: the output stays on the device, messages are recorded on the CPU."""
    if not torch.cuda.is_available():
        raise NotApplicable("no CUDA device")
    comp = s.build()
    for seed in range(2):
        grads = battery_grads(seed, device="cuda")
        out, comm = run_step(comp, grads)
        reason = output_problem(grads, out)
        if reason:
            return reason + " (CUDA gradients)"
        if not all(m.tensor.device.type == "cpu" for m in comm.messages):
            return "a message of a CUDA step was not recorded on the CPU"
        if not all_close(decode_step(comp, comm, grads), out):
            return "decode differs from the CUDA output"
    return ""
