"""The parent's side of an audited plug-in: a worker process and proxies that forward to it.

:class:`WorkerSession` starts ``python -m gia_bench.audit_worker`` (a fresh interpreter:
nothing the plug-in does at import reaches this process), sends it requests as
:mod:`gia_bench.wire` frames and waits for each answer at most ``timeout_s`` seconds: a
hung plug-in is stopped and its check fails with one line. :class:`RemoteCompressor`
has the :class:`~gia_bench.defenses.base.Compressor` methods the contract battery calls;
each forwards to one instance in the worker and returns what it answered as plain
tensors, so :mod:`gia_bench.contract` judges a plug-in with the same code as a built-in.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import weakref
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gia_bench.comm import Communicator, Message
from gia_bench.errors import PluginError
from gia_bench.registry import Param
from gia_bench.wire import WireError, read_frame, write_frame

#: seconds a worker may take to start: import torch, gia_bench and the plug-in (a loaded machine is slow)
START_TIMEOUT_S = 120.0


class RemoteError(Exception):
    """The plug-in raised in the worker; ``remote_type`` is its exception's type name."""

    def __init__(self, remote_type: str, message: str) -> None:
        super().__init__(message)
        self.remote_type = remote_type


class WorkerGone(Exception):
    """The worker process died, hung past its timeout, or answered garbage; it is stopped."""


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
            pass


def _pair(value: Any) -> tuple[str, str]:
    """(exception type name, message) as the worker reported it; anything else it sent is shown as is."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return str(value[0]), str(value[1])
    return "UnknownError", repr(value)[:200]


class WorkerSession:
    """One worker process holding the audited plug-in (``spec``) and the instances built in it."""

    def __init__(self, spec: str, timeout_s: float = 120.0) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.gone: str | None = None
        env = dict(os.environ)
        # gia_bench itself must import in the worker before it can take over the parent's sys.path
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gia_bench.audit_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, start_new_session=False,
        )
        self._finalizer = weakref.finalize(self, _kill, self.proc)
        self._ids = itertools.count(1)  # id 0: the instance the worker builds with the audited parameters
        self._classes: dict[str, type] = {}
        write_frame(self.proc.stdin.fileno(), {"sys_path": [p for p in sys.path if isinstance(p, str)],
                                                "spec": spec, "threads": torch.get_num_threads()})
        try:
            self.hello = self._read("start", max(START_TIMEOUT_S, timeout_s))
        except WorkerGone as exc:  # it died or hung while importing the plug-in: the user's to fix, one line
            raise PluginError(f"defense {spec!r}: {exc}") from None
        if "refused" in self.hello:
            kind, message = _pair(self.hello["refused"])
            self.close()
            if self.hello.get("user_error"):
                raise PluginError(message)
            raise PluginError(f"defense {spec!r}: loading it raised {kind}: {message}")

    # -- transport ----------------------------------------------------------------------------------
    def _read(self, what: str, timeout: float) -> Any:
        try:
            answer = read_frame(self.proc.stdout.fileno(), timeout)
        except TimeoutError:
            self._stop(f"the plug-in did not answer within {timeout:g} s ({what}); its worker process was stopped")
        except EOFError:
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            self._stop(f"the plug-in's worker process exited (code {code}) during {what}")
        except WireError as exc:
            self._stop(f"the plug-in's worker process sent a malformed answer during {what}: {exc}")
        if not isinstance(answer, dict):
            self._stop(f"the plug-in's worker process sent a malformed answer during {what}")
        return answer

    def _stop(self, reason: str) -> None:
        self.gone = reason
        _kill(self.proc)  # hung or broken: no point waiting for it to read the end of its input
        self.close()
        raise WorkerGone(reason)

    def request(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Send ``op`` with ``args``; its answer, or :class:`RemoteError` / :class:`WorkerGone`."""
        if self.gone is not None:
            raise WorkerGone(self.gone)
        try:
            write_frame(self.proc.stdin.fileno(), {"op": op, **args})
        except (BrokenPipeError, OSError):
            self._read(op, 10.0)  # the worker is gone: say how
        answer = self._read(op, self.timeout_s if timeout is None else timeout)
        if "raised" in answer:
            raise RemoteError(*_pair(answer["raised"]))
        return answer.get("ok")

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # the worker's read ends: it exits on its own
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    # -- proxies ------------------------------------------------------------------------------------
    def proxy_class(self, info: dict[str, Any]) -> type:
        """One proxy class per class in the worker, so ``type(a) is type(b)`` means what it means there."""
        identity = str(info["identity"])
        if identity not in self._classes:
            cls = type(str(info["qualname"]).rsplit(".", 1)[-1], (RemoteCompressor,), {
                "supports_simulate": bool(info["supports_simulate"]),
                "differentiable_simulate": bool(info["differentiable_simulate"]),
                "adds_noise": bool(info["adds_noise"]),
            })
            cls.__module__ = str(info["module"])
            cls.__qualname__ = str(info["qualname"])
            self._classes[identity] = cls
        return self._classes[identity]

    def new(self, spec: str | None = None) -> RemoteCompressor:
        """A fresh instance in the worker: the audited parameters, or what ``spec`` rebuilds."""
        id = next(self._ids)
        info = self.request("new", id=id, spec=spec)
        return self.proxy_class(info)(self, id)


class RemoteSubject:
    """The audited plug-in as seen from the parent: its worker, its description, fresh instances."""

    def __init__(self, spec: str, timeout_s: float = 120.0) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.session = WorkerSession(spec, timeout_s)
        hello = self.session.hello
        self.construct_error: str | None = None
        try:
            if "construct" in hello:
                kind, message = _pair(hello["construct"])
                self.construct_error = f"raised {kind}: {message}"
            info = hello.get("info") or {"summary": "", "params": []}
            self.summary: str = str(info["summary"])
            self.params: list[Param] = [
                Param(str(p["name"]), str(p["type"]), None, str(p["help"])) for p in info["params"]
            ]
            self.canonical: str | None = None if hello.get("spec") is None else str(hello["spec"])
            self.qualname: str = str(hello["class"]["qualname"]) if "class" in hello else spec
        except (KeyError, TypeError, ValueError, AttributeError):  # the plug-in runs in the worker: it may forge this
            self.session.close()
            raise PluginError(f"defense {spec!r}: its worker process described it in a malformed answer") from None

    @property
    def gone(self) -> str | None:
        return self.session.gone

    def build(self) -> RemoteCompressor:
        return self.session.new()

    def rebuild(self, spec: str) -> RemoteCompressor:
        return self.session.new(spec)

    def fresh(self) -> RemoteSubject:
        """The same plug-in in a new worker process (a receiver that never saw the workers' state)."""
        return RemoteSubject(self.spec, self.timeout_s)

    def gloo_runs(self) -> list[dict[str, Any]]:
        """The gloo check's runs (one per rank), made by the worker's own two gloo processes."""
        return self.session.request("gloo", timeout=max(300.0, 4 * self.timeout_s))

    def close(self) -> None:
        self.session.close()


class _RemoteSimulate(torch.autograd.Function):
    """``simulate`` in the worker, differentiable here: the backward asks the worker for the VJP."""

    @staticmethod
    def forward(ctx, proxy: RemoteCompressor, call: int, keys: tuple[str, ...], views: dict, *grads: torch.Tensor):
        ctx.proxy, ctx.call, ctx.keys = proxy, call, keys
        return tuple(views[k].clone() for k in keys)

    @staticmethod
    def backward(ctx, *cotangents: torch.Tensor):
        got = ctx.proxy.session.request("vjp", call=ctx.call, cotangents=dict(zip(ctx.keys, cotangents)))
        return (None, None, None, None, *got)


class RemoteCompressor:
    """A compressor instance living in the worker; the battery calls it like a local one."""

    supports_simulate = False
    differentiable_simulate = True
    adds_noise = False
    _calls = itertools.count()

    def __init__(self, session: WorkerSession, id: int) -> None:
        self.session = session
        self.id = id
        self.last_aliases: list[tuple[int, int]] = []

    @property
    def spec(self) -> str:
        return str(self.session.request("spec", id=self.id))

    def step(self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None) -> Any:
        answer = self.session.request("step", id=self.id, grads=list(grads), keys=None if keys is None else list(keys))
        for given, after in zip(grads, answer["inputs"]):
            if isinstance(after, torch.Tensor) and not torch.equal(given, after.to(given.device)):
                given.copy_(after)  # the step wrote into its inputs there; so it did here
        for m in answer["messages"]:
            # the worker's claims (dtype, shape, byte counts) as it logged them; the battery holds them to the tensor
            comm.messages.append(Message(
                tag=m["tag"], op=m["op"], dtype=m["dtype"], shape=tuple(m["shape"]), nbytes=int(m["nbytes"]),
                payload_nbytes=int(m["payload_nbytes"]), tensor=m["tensor"] if comm.record else None,
            ))
        self.last_aliases = [(int(i), int(j)) for i, j in answer["aliases"]]
        return answer["out"]

    def decode(self, messages: Mapping[str, torch.Tensor], shapes: Sequence[torch.Size],
               public: Mapping[str, torch.Tensor] | None = None) -> Any:
        return self.session.request("decode", id=self.id, messages=dict(messages), shapes=[tuple(s) for s in shapes],
                                    public=None if public is None else dict(public))

    def public_state(self) -> Any:
        return self.session.request("public_state", id=self.id)

    def message_values(self, messages: Mapping[str, torch.Tensor], shapes: Sequence[torch.Size],
                       public: Mapping[str, torch.Tensor] | None = None) -> Any:
        return self.session.request("message_values", id=self.id, messages=dict(messages),
                                    shapes=[tuple(s) for s in shapes], public=None if public is None else dict(public))

    def simulate(self, grads: Sequence[torch.Tensor], messages: Mapping[str, torch.Tensor],
                 public: Mapping[str, torch.Tensor] | None = None) -> Any:
        call = next(self._calls)
        answer = self.session.request(
            "simulate", id=self.id, call=call, grads=[g.detach() for g in grads],
            requires_grad=[bool(g.requires_grad) for g in grads], messages=dict(messages),
            public=None if public is None else dict(public),
        )
        views = answer["views"]
        if not isinstance(views, dict) or not all(isinstance(v, torch.Tensor) for v in views.values()):
            return views
        keys = tuple(views)
        if not any(g.requires_grad for g in grads):
            return views
        out = _RemoteSimulate.apply(self, call, keys, views, *grads)
        differentiable = set(answer["differentiable"])
        return {k: (v if k in differentiable else v.detach()) for k, v in zip(keys, out)}

    def state_dict(self) -> Any:
        return self.session.request("state", id=self.id)

    def state_round_trip(self) -> RemoteState:
        """The state_dict through torch.save / torch.load(weights_only=True), done (and kept) in the worker."""
        handle = next(self._calls)
        self.session.request("state_round_trip", id=self.id, handle=handle)
        return RemoteState(handle)

    def load_state_dict(self, state: Any) -> None:
        if isinstance(state, RemoteState):
            self.session.request("load_state", id=self.id, handle=state.handle)
        else:
            self.session.request("load_state", id=self.id, state=state)

    def __repr__(self) -> str:
        return f"<remote {type(self).__qualname__} #{self.id}>"


class RemoteState:
    """A state_dict kept in the worker (it may hold what cannot travel as data)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

