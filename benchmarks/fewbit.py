"""Few-Bit Backward: memory a training step keeps for its backward pass, and what the gradient loses.

For each model (ConvNet, ResNet-18 (CIFAR stem), DLG's LeNet; 32x32 RGB input, batch
``--batch``) and each setting (exact backward, ``--fewbit-backward`` 1, 2, 4, 8 bits):

* ``saved_bytes``: bytes of every tensor autograd keeps for the backward pass of one
  training step (``torch.autograd.graph.saved_tensors_hooks``, storages counted once:
  an activation output that the next layer also saves is one tensor);
* ``peak_rss_mb``: peak resident memory of a fresh process that builds the model and
  runs one forward + backward (``resource.getrusage``; includes torch itself, so the
  difference between rows is what matters);
* ``grad_rel_error``: ``||g_fewbit - g_exact|| / ||g_exact||`` for the same weights and batch.

    .venv/bin/python benchmarks/fewbit.py [--models convnet,resnet18,lenet] [--batch 32]

prints one JSON object. The DP tables are computed once per (function, bits) and cached
in the process; their build time is reported too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from gia_bench import fewbit
from gia_bench.models import ModelSpec, build_model

SPECS = {"convnet": "convnet:width=16", "resnet18": "resnet18", "lenet": "lenet"}


def _step(model_spec: str, bits: int, batch: int) -> tuple[int, list[torch.Tensor]]:
    model = build_model(ModelSpec(model_spec, (3, 32, 32), 10, "train", bits), seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return sum(storages.values()), [g.detach() for g in grads]


def _rss_child(model_spec: str, bits: int, batch: int) -> None:
    import resource

    _step(model_spec, bits, batch)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="convnet,resnet18,lenet")
    ap.add_argument("--bits", default="1,2,4,8")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak RSS measurement")
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args._child:
        _rss_child(args._child[0], int(args._child[1]), int(args._child[2]))
        return
    bit_list = [int(b) for b in args.bits.split(",")]
    t0 = time.perf_counter()
    for f in fewbit.FUNCTIONS:
        for b in bit_list:
            fewbit.table(f, b)
    rows = []
    for name in args.models.split(","):
        spec = SPECS[name]
        exact_bytes, exact = _step(spec, 0, args.batch)
        flat = torch.cat([g.reshape(-1) for g in exact])
        for bits in [0, *bit_list]:
            saved, grads = (exact_bytes, exact) if bits == 0 else _step(spec, bits, args.batch)
            approx = torch.cat([g.reshape(-1) for g in grads])
            row = {
                "model": spec,
                "fewbit_backward": bits,
                "saved_bytes": saved,
                "saved_vs_exact": saved / exact_bytes,
                "grad_rel_error": float((approx - flat).norm() / flat.norm()),
            }
            if not args.no_rss:
                out = subprocess.run(
                    [sys.executable, __file__, "--_child", spec, str(bits), str(args.batch)],
                    capture_output=True, text=True, check=True,
                )
                row["peak_rss_mb"] = float(out.stdout.strip().splitlines()[-1])
            rows.append(row)
    print(json.dumps({"batch": args.batch, "table_build_seconds": time.perf_counter() - t0, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
