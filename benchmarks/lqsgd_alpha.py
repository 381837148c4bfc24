"""LQ-SGD's alpha, measured: reconstruction error of real gradients, bytes, collectives, time.

Prints one JSON object:

* ``sweep``: for LeNet and ResNet-18 (CIFAR stem) gradients of a ``digits`` batch, and
  each bits x alpha, the relative error of one LQ-SGD step against PowerSGD's at the same
  rank and seed (``vs_powersgd``: the damage the quantizer adds) and against the true
  gradient (``vs_gradient``; PowerSGD's own figure is given beside);
* ``bytes``: one worker's bytes per step on torchvision's resnet18(num_classes=10);
* ``collectives``: bytes one worker sends per step with N workers, all-gather against
  all-to-all (counted by the same rules as ``TorchCommunicator``, on N identical workers);
* ``timing`` (``--timing``): seconds per step of PyTorch's powerSGD_hook, ours, LQ-SGD.

    .venv/bin/python benchmarks/lqsgd_alpha.py [--timing] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence

import torch
import torchvision

from gia_bench.comm import Communicator, LocalCommunicator
from gia_bench.data import load_dataset
from gia_bench.defenses.lqsgd import LQSGD
from gia_bench.defenses.powersgd import PowerSGD
from gia_bench.models import ModelSpec, build_model

ALPHAS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
BITS = (4, 6, 8)


class IdenticalWorkers(Communicator):
    """N workers that all send what this one sends: byte counts of a real N-worker run."""

    def __init__(self, world_size: int) -> None:
        super().__init__(record=False)
        self.world_size = world_size

    def wire_bytes(self, op: str, payload: int) -> int:
        n = self.world_size
        return {
            "all_reduce": math.ceil(2 * (n - 1) * payload / n),
            "all_gather": (n - 1) * payload,
            "all_to_all": math.ceil((n - 1) * payload / n),
        }[op]

    def _all_reduce(self, tensor):
        return tensor.mul_(self.world_size)

    def _all_gather(self, tensor):
        return [tensor] * self.world_size

    def _all_to_all(self, chunks):
        return [chunks[self.rank]] * self.world_size


def gradients(model_name: str, batch: int = 8, device: str = "cpu") -> list[torch.Tensor]:
    data = load_dataset("digits")
    spec = ModelSpec(model_name, data.spec.shape, data.spec.num_classes)
    model = build_model(spec, seed=0, device=device)
    x, y = data.batch(range(batch))
    loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def sweep(rank: int, device: str) -> dict:
    out = {}
    for model_name in ("lenet", "resnet18"):
        grads = gradients(model_name, device=device)
        g = flat(grads)
        ps = flat(PowerSGD(rank=rank).step(grads, LocalCommunicator(record=False)))
        rows = []
        for bits in BITS:
            for alpha in ALPHAS:
                lq = flat(LQSGD(rank=rank, bits=bits, alpha=alpha).step(grads, LocalCommunicator(record=False)))
                rows.append(
                    {"bits": bits, "alpha": alpha, "vs_powersgd": rel(lq, ps), "vs_gradient": rel(lq, g)}
                )
        best = {b: min((r for r in rows if r["bits"] == b), key=lambda r: r["vs_powersgd"])["alpha"] for b in BITS}
        out[model_name] = {"powersgd_vs_gradient": rel(ps, g), "rows": rows, "best_alpha": best}
    return out


def resnet_shapes() -> list[torch.Size]:
    with torch.device("meta"):
        return [p.shape for p in torchvision.models.resnet18(num_classes=10).parameters()]


def byte_figures(rank: int) -> dict:
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(resnet_shapes())]
    figures = {"fp32": sum(g.numel() for g in grads) * 4}
    for name, comp in {
        "powersgd": PowerSGD(rank=rank),
        "lqsgd_8bit": LQSGD(rank=rank, bits=8),
        "lqsgd_8bit_rest_fp32": LQSGD(rank=rank, bits=8, quantize_rest=False),
        "lqsgd_6bit": LQSGD(rank=rank, bits=6),
        "lqsgd_4bit": LQSGD(rank=rank, bits=4),
    }.items():
        comm = LocalCommunicator(record=False)
        comp.step(grads, comm)
        figures[name] = {"bytes": comm.bytes_sent, "by_tag": {m.tag: m.nbytes for m in comm.messages}}
    for name in ("lqsgd_8bit", "lqsgd_8bit_rest_fp32", "lqsgd_6bit", "lqsgd_4bit"):
        figures[name]["fraction_of_powersgd"] = figures[name]["bytes"] / figures["powersgd"]["bytes"]
    return figures


def collective_figures(rank: int, bits: int = 8) -> dict:
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(resnet_shapes())]
    out = {}
    for n in (2, 4, 8, 16, 32):
        row = {}
        for name, comp in {
            "powersgd_allreduce": PowerSGD(rank=rank),
            "lqsgd_allgather": LQSGD(rank=rank, bits=bits, collective="allgather"),
            "lqsgd_alltoall": LQSGD(rank=rank, bits=bits, collective="alltoall"),
        }.items():
            comm = IdenticalWorkers(n)
            comp.step(grads, comm)
            row[name] = comm.bytes_sent
        row["auto"] = LQSGD(bits=bits).collective_for(n)
        out[str(n)] = row
    return out


def timing(rank: int, device: str, repeats: int = 5) -> dict:
    """Seconds per step on ResNet-18 gradients: PyTorch's hook (one bucket), ours, LQ-SGD."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ref

    grads = [g.to(device) for g in gradients("resnet18", device=device)]
    tmp = tempfile.mkdtemp()
    dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1)

    class Bucket:
        def __init__(self, gs):
            self.buf = torch.cat([g.reshape(-1) for g in gs])
            self.views, o = [], 0
            for g in gs:
                self.views.append(self.buf[o : o + g.numel()].view(g.shape))
                o += g.numel()

        def buffer(self):
            return self.buf

        def gradients(self):
            return self.views

        def index(self):
            return 0

        def is_last(self):
            return True

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    state = ref.PowerSGDState(None, matrix_approximation_rank=rank, start_powerSGD_iter=2, random_seed=0)
    state.start_powerSGD_iter = 0
    runs = {
        "pytorch_powersgd_hook": lambda: ref.powerSGD_hook(state, Bucket(grads)).wait(),
        "powersgd": (lambda c: lambda: c.step(grads, LocalCommunicator(record=False)))(PowerSGD(rank=rank)),
        "lqsgd_8bit": (lambda c: lambda: c.step(grads, LocalCommunicator(record=False)))(LQSGD(rank=rank, bits=8)),
        "lqsgd_6bit": (lambda c: lambda: c.step(grads, LocalCommunicator(record=False)))(LQSGD(rank=rank, bits=6)),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for name, fn in runs.items():
        fn()  # warm-up (Q init, caches)
    for _ in range(repeats):  # interleaved, so that load on a shared machine hits all alike
        for name, fn in runs.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    dist.destroy_process_group()
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    base = med["pytorch_powersgd_hook"]
    return {"median_s": med, "ratio_to_pytorch": {k: v / base for k, v in med.items()}, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timing", action="store_true", help="also time PyTorch's hook, ours and LQ-SGD")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    result = {
        "rank": args.rank,
        "device": args.device,
        "sweep": sweep(args.rank, args.device),
        "bytes": byte_figures(args.rank),
        "collectives": collective_figures(args.rank),
    }
    if args.timing:
        result["timing"] = timing(args.rank, args.device, args.repeats)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
