"""The process an audited plug-in runs in: ``python -m gia_bench.audit_worker``.

``gia-bench audit module:Class`` never imports the plug-in in its own process: a module
that patched :mod:`gia_bench.contract` at import (every check passes) or the byte counts
would pass its own audit. This worker imports it, holds its instances, and answers the
parent's requests (:class:`gia_bench.remote.WorkerSession`): build an instance, ``step``
on the gradients the parent sent, ``decode`` these messages, ... Every answer is data (a
:mod:`gia_bench.wire` frame: JSON and safetensors, never a pickle), and the parent does
all the judging, so what the plug-in changes in this process changes only its own answers.

Protocol: frames on the worker's original stdin and stdout. The plug-in's own prints go
to stderr (fd 1 is pointed there), so they cannot corrupt the answers. Each request is
``{"op": ..., ...}``; each answer ``{"ok": value}`` or ``{"raised": [type name, message]}``.
``python -m gia_bench.audit_worker --battery JOB.json`` runs the audit's study battery
(which runs the plug-in too) and writes the outcome as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gia_bench.comm import LocalCommunicator
from gia_bench.wire import read_frame, write_frame


class Worker:
    """The plug-in's instances (by the parent's ids) and the requests on them."""

    def __init__(self, spec: str) -> None:
        from gia_bench.contract import Subject

        self.subject = Subject.from_spec(spec, remote=False)  # resolves (imports) the plug-in, here only
        self.instances: dict[int, Any] = {}
        self.states: dict[int, Any] = {}  # state_dicts after their torch.save / torch.load round trip
        self.simulations: dict[int, tuple[list[torch.Tensor], dict[str, torch.Tensor]]] = {}

    def info(self) -> dict[str, Any]:
        """What the parent needs to know of the class without importing it."""
        from gia_bench.registry import describe_params, summary

        cls = self.subject.cls
        return {
            "summary": summary(cls),
            "params": [{"name": p.name, "type": p.type, "help": p.help} for p in describe_params(cls)],
        }

    @staticmethod
    def class_info(obj: Any) -> dict[str, Any]:
        cls = type(obj)
        return {
            "module": cls.__module__,
            "qualname": cls.__qualname__,
            "identity": f"{cls.__module__}:{cls.__qualname__}#{id(cls)}",
            "supports_simulate": bool(getattr(obj, "supports_simulate", False)),
            "differentiable_simulate": bool(getattr(obj, "differentiable_simulate", True)),
            "adds_noise": bool(getattr(cls, "adds_noise", False)),
        }

    # -- requests -------------------------------------------------------------------------------------
    def op_new(self, id: int, spec: str | None = None) -> dict[str, Any]:
        comp = self.subject.build() if spec is None else self.subject.from_spec_string(spec)
        self.instances[id] = comp
        return self.class_info(comp)

    def op_spec(self, id: int) -> str:
        return str(self.instances[id].spec)

    def op_step(self, id: int, grads: list[torch.Tensor], keys: Any = None) -> dict[str, Any]:
        from gia_bench.contract import output_aliases

        comm = LocalCommunicator(record=True)
        out = self.instances[id].step(grads, comm, keys=keys)
        return {
            "out": out,
            "messages": [
                {"tag": m.tag, "op": m.op, "dtype": m.dtype, "shape": tuple(m.shape), "nbytes": m.nbytes,
                 "payload_nbytes": m.payload_nbytes, "tensor": m.tensor}
                for m in comm.messages
            ],
            "inputs": grads,  # as step left them (a step that writes into its inputs shows here)
            "aliases": output_aliases(grads, out),
        }

    def op_decode(self, id: int, messages: dict, shapes: list, public: dict | None = None) -> Any:
        return self.instances[id].decode(messages, [torch.Size(s) for s in shapes], public)

    def op_public_state(self, id: int) -> Any:
        return self.instances[id].public_state()

    def op_message_values(self, id: int, messages: dict, shapes: list, public: dict | None = None) -> Any:
        return self.instances[id].message_values(messages, [torch.Size(s) for s in shapes], public)

    def op_simulate(self, id: int, call: int, grads: list[torch.Tensor], requires_grad: list[bool],
                    messages: dict, public: dict | None = None) -> dict[str, Any]:
        candidate = [g.requires_grad_(bool(r)) if g.is_floating_point() else g for g, r in zip(grads, requires_grad)]
        views = self.instances[id].simulate(candidate, messages, public)
        if not isinstance(views, dict):
            return {"views": views, "differentiable": []}
        self.simulations[call] = (candidate, views)
        return {
            "views": {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in views.items()},
            "differentiable": [k for k, v in views.items() if isinstance(v, torch.Tensor) and v.requires_grad],
        }

    def op_vjp(self, call: int, cotangents: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
        candidate, views = self.simulations.pop(call)
        keys = [k for k in cotangents if views[k].requires_grad]
        inputs = [c for c in candidate if c.requires_grad]
        if not keys or not inputs:
            return [None] * len(candidate)
        got = iter(torch.autograd.grad([views[k] for k in keys], inputs, [cotangents[k] for k in keys],
                                       allow_unused=True))
        return [next(got) if c.requires_grad else None for c in candidate]

    def op_state(self, id: int) -> Any:
        return self.instances[id].state_dict()

    def op_state_round_trip(self, id: int, handle: int) -> None:
        """state_dict through torch.save / torch.load(weights_only=True), kept here under ``handle``."""
        import copy
        import io

        buf = io.BytesIO()
        torch.save(copy.deepcopy(self.instances[id].state_dict()), buf)
        buf.seek(0)
        self.states[handle] = torch.load(buf, weights_only=True)

    def op_load_state(self, id: int, handle: int | None = None, state: Any = None) -> None:
        self.instances[id].load_state_dict(self.states[handle] if handle is not None else state)

    def op_gloo(self) -> list[dict[str, Any]]:
        from gia_bench.contract import gloo_runs

        s = self.subject
        return [r[s.label] for r in gloo_runs({s.label: (s.cls, s.kwargs)})]


def _answer(fn: Callable[..., Any], args: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"ok": fn(**args)}
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:  # a plug-in's sys.exit is its failure, reported like an exception
        return {"raised": ["SystemExit", f"the plug-in called sys.exit({exc.code!r})"]}
    except BaseException as exc:  # noqa: BLE001  (third-party code may raise anything; the parent judges it)
        return {"raised": [type(exc).__name__, str(exc)]}


def serve(spec: str, requests: int, answers: int) -> None:
    """Answer the parent's requests on the file descriptors ``requests`` / ``answers`` until it closes them."""
    started = _answer(lambda: Worker(spec), {})
    if "raised" in started:
        # a spec the registry refuses is the user's error (exit 2), not a failed check
        write_frame(answers, {"refused": started["raised"], "user_error": _is_user_error(started["raised"][0])})
        return
    worker: Worker = started["ok"]
    built = _answer(lambda: (worker.info(), worker.op_new(0)), {})
    if "raised" in built:
        write_frame(answers, {"construct": built["raised"], "info": _answer(worker.info, {}).get("ok")})
    else:
        info, cls = built["ok"]
        write_frame(answers, {"info": info, "class": cls, "spec": _answer(worker.op_spec, {"id": 0}).get("ok")})
    while True:
        try:
            request = read_frame(requests)
        except EOFError:
            return
        op = request.pop("op")
        fn = getattr(worker, f"op_{op}", None)
        answer = {"raised": ["ValueError", f"unknown request {op!r}"]} if fn is None else _answer(fn, request)
        write_frame(answers, answer, strict=False)


def _is_user_error(type_name: str) -> bool:
    from gia_bench import errors

    cls = getattr(errors, type_name, None)
    return isinstance(cls, type) and issubclass(cls, errors.GiaBenchError)


def run_battery(job_path: Path) -> None:
    """The audit's study battery (``--battery JOB.json``: the study as JSON, the out folder, options)."""
    from gia_bench.event_relay import EventWriter
    from gia_bench.events import SILENT
    from gia_bench.study import StudyOptions, parse_study, run_study

    job = json.loads(job_path.read_text(encoding="utf-8"))
    config = parse_study(job["study"], "audit battery")
    options = StudyOptions(workers=job["workers"], lpips_weights=None if job["lpips_weights"] is None else Path(job["lpips_weights"]))
    # the parent replays these on its own Events (its bars, its log lines)
    events = SILENT if not isinstance(job.get("events"), str) else EventWriter(job["events"])
    st = run_study(config, Path(job["out"]), options, events)
    outcome = {"failures": list(st.failures), "report": None if st.report is None else str(st.report)}
    Path(job["outcome"]).write_text(json.dumps(outcome), encoding="utf-8")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--battery"]:
        try:
            run_battery(Path(argv[1]))
        except KeyboardInterrupt:
            # the parent got the same Ctrl-C and says what was kept; finished units are on disk
            raise SystemExit(130) from None
        return
    # Ctrl-C reaches the whole process group: the parent stops this worker (closing its pipe, or killing it)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the answers go to the original stdout; anything the plug-in prints goes to stderr
    requests, answers = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    hello = read_frame(requests)
    sys.path[:] = [str(p) for p in hello["sys_path"]]  # import what the parent would import, from where it would
    torch.set_num_threads(int(hello.get("threads", 1)))
    serve(str(hello["spec"]), requests, answers)


if __name__ == "__main__":
    main(sys.argv[1:])
