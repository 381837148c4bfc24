"""Two real worker processes over gloo: the same aggregate on every rank, ring byte counts, and
decode in a process that never saw the step."""

from __future__ import annotations

import datetime
import math
import socket
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from gia_bench.defenses.base import Compressor
from gia_bench.contract.base import (
    Subject,
    all_close,
    battery_grads,
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, world_size: int, port: int, subjects: dict[str, tuple[type, dict]], out_dir: str) -> None:
    """Two steps of every subject through a TorchCommunicator; saves ``rank{rank}.pt``:
    ``{label: {"steps": [{"inputs", "out", "public", "messages"}, ...]} or {"error": traceback}}``.

    At module level because ``torch.multiprocessing.spawn`` pickles the worker by name; the
    subjects travel as (class, kwargs), so a plug-in needs no registry entry in the workers.
    """
    import torch.distributed as dist

    from gia_bench.comm import TorchCommunicator

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict[str, dict] = {}
    try:
        for label, (klass, kwargs) in subjects.items():
            try:
                comp = klass(**kwargs)
                steps = []
                for step in range(2):
                    grads = battery_grads(seed=1000 * step + rank)
                    comm = TorchCommunicator(record=True)
                    out = comp.step([g.clone() for g in grads], comm)
                    public = {k: v.detach().cpu().clone() for k, v in comp.public_state().items()}
                    # what this process decodes from its own messages, with a fresh instance
                    try:
                        own = klass(**kwargs).decode(
                            {m.tag: m.tensor for m in comm.messages}, [g.shape for g in grads], public
                        )
                    except Exception:  # noqa: BLE001  (nothing to compare against; see check_gloo_run)
                        own = None
                    steps.append(
                        {
                            "inputs": grads,
                            "out": [o.detach().clone() for o in out],
                            "decoded": None if own is None else [d.detach().cpu().clone() for d in own],
                            "public": public,
                            "messages": [
                                {
                                    "tag": m.tag,
                                    "op": m.op,
                                    "nbytes": m.nbytes,
                                    "payload_nbytes": m.payload_nbytes,
                                    "tensor": m.tensor,
                                }
                                for m in comm.messages
                            ],
                        }
                    )
                results[label] = {"steps": steps}
            except Exception:  # reported per compressor by check_gloo_run
                results[label] = {"error": traceback.format_exc()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def gloo_runs(subjects: dict[str, tuple[type, dict]], world_size: int = 2) -> list[dict[str, dict]]:
    """Spawn ``world_size`` gloo workers once for all ``subjects``; one result dict per rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="gia-bench-gloo-") as tmp:
        mp.spawn(_gloo_worker, args=(world_size, _free_port(), subjects, tmp), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


def ring_bytes(op: str, payload: int, n: int) -> int:
    """Bytes per worker of the bandwidth-optimal ring collectives (comm.py's accounting)."""
    return {
        "all_reduce": math.ceil(2 * (n - 1) * payload / n),
        "all_gather": (n - 1) * payload,
        "all_to_all": math.ceil((n - 1) * payload / n),
    }[op]


def check_gloo_run(runs: Sequence[dict], build: Callable[[], Compressor] | None = None) -> str:
    """The reason one compressor's runs (one per rank, from :func:`gloo_runs`) break the contract, or "".

    With ``build`` (fresh instances), each rank's messages are also decoded here, in a
    process that never saw that rank's gradient, and must give what the rank decoded
    itself: decode must not read a global or class attribute the step filled.
    """
    for rank, run in enumerate(runs):
        if "error" in run:
            return f"failed on rank {rank} of {len(runs)} gloo workers:\n{run['error']}"
    n = len(runs)
    if build is not None:
        for rank, run in enumerate(runs):
            for step, s in enumerate(run["steps"]):
                if s.get("decoded") is None:
                    # the worker could not decode its own multi-worker messages: no reference to compare
                    # with (the in-process checks hold decode to the output with one worker)
                    continue
                messages = {m["tag"]: m["tensor"] for m in s["messages"]}
                try:
                    here = build().decode(messages, [g.shape for g in s["inputs"]], s["public"])
                except Exception as exc:  # a plug-in's decode may fail in any way; this is the finding
                    here, error = None, f"{type(exc).__name__}: {exc}"
                if here is None or not all_close(here, s["decoded"], 1e-6):
                    return (
                        f"decode of rank {rank}'s messages (step {step}) in another process"
                        f" {'raised ' + error if here is None else 'differs from the one in its own process'}:"
                        " decode reads state the step left in its process (a global or class attribute),"
                        " which the receiver does not have"
                    )
    for step, per_rank in enumerate(zip(*(r["steps"] for r in runs))):
        # replicas stay in sync only if every rank computes exactly the same aggregate
        for rank_run in per_rank[1:]:
            if not all(torch.equal(a, b) for a, b in zip(per_rank[0]["out"], rank_run["out"])):
                return f"step {step}: the {n} gloo workers computed different aggregates (replicas would drift)"
        for rank, s in enumerate(per_rank):
            if not s["messages"]:
                return f"step {step}: rank {rank} sent nothing"
            for m in s["messages"]:
                t = m["tensor"]
                if m["payload_nbytes"] != t.numel() * t.element_size():
                    return f"step {step}: message {m['tag']!r} payload counted {m['payload_nbytes']} bytes, the tensor has {t.numel() * t.element_size()}"
                if m["nbytes"] != ring_bytes(m["op"], m["payload_nbytes"], n):
                    return f"step {step}: message {m['tag']!r} ({m['op']}) counted {m['nbytes']} wire bytes, the ring sends {ring_bytes(m['op'], m['payload_nbytes'], n)}"
    return ""


def check_gloo(s: Subject) -> str:
    """Two worker processes over gloo compute the same aggregate, with ring byte counts."""
    if s.remote is None:
        runs = gloo_runs({s.label: (s.cls, s.kwargs)})
        return check_gloo_run([r[s.label] for r in runs], s.build)
    # the worker spawns the two gloo processes; their messages are decoded in yet another worker,
    # which never ran a step (a receiver has nothing the workers' processes kept)
    runs = s.remote.gloo_runs()
    receiver = s.remote.fresh()
    try:
        return check_gloo_run(runs, receiver.build)
    finally:
        receiver.close()
