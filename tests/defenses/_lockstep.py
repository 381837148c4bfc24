"""Several workers in one process, in lockstep threads: the all-gather logic of a compressor runs
without spawning processes (tests of compressors whose messages are gathered, not summed)."""

from __future__ import annotations

import threading

from gia_bench.comm import Communicator, messages_by_tag


class LockstepCommunicator(Communicator):
    """All-gather between threads; bytes counted as the worker's own payload."""

    def __init__(self, rank: int, shared: dict) -> None:
        super().__init__(record=True)
        self.rank, self.world_size, self.shared = rank, shared["n"], shared

    def wire_bytes(self, op: str, payload: int) -> int:
        return payload

    def _all_gather(self, tensor):
        self.shared["slots"][self.rank] = tensor.clone()
        self.shared["barrier"].wait()
        out = [t.clone() for t in self.shared["slots"]]
        self.shared["barrier"].wait()
        return out

    def _all_reduce(self, tensor):
        return tensor.copy_(sum(self._all_gather(tensor)))


def run_workers(comps, grads_per_worker):
    """One step of ``comps[r]`` on ``grads_per_worker[r]`` per worker, together;
    returns per worker (output, messages by tag, public state, communicator)."""
    n = len(comps)
    shared = {"n": n, "slots": [None] * n, "barrier": threading.Barrier(n)}
    results = [None] * n

    def work(rank):
        comm = LockstepCommunicator(rank, shared)
        out = comps[rank].step(grads_per_worker[rank], comm)
        results[rank] = (out, messages_by_tag(comm.messages), comps[rank].public_state(), comm)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results
