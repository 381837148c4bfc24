"""Bytes per step and compress + decode time of every registered compressor.

On the gradients of torchvision's plain ``resnet18(num_classes=10)`` (11,181,642
parameters in 62 tensors) and of DLG's sigmoid LeNet, for a batch of 32x32 images:
one row per model x compressor at its default spec, plus ``lqsgd:bits=8`` and
``powersgd:rank=2`` when those are registered. Bytes are what a
:class:`~gia_bench.comm.LocalCommunicator` logs for one worker's first step (the
payload of every message); times are the median over ``--repeats`` steps after a
warm-up step, of ``step`` (with message recording, as ``capture`` does) and of
``decode`` of the recorded messages (recorded messages live on the CPU, so ``decode``
runs there even with ``--device cuda``, and ``step`` includes copying them). For LQ-SGD the row also holds PowerSGD's bytes at
the same rank and the ratio between them.

    .venv/bin/python benchmarks/compressors.py --quick --table

prints one JSON object on stdout (``--table``: a Markdown table on stderr too).

``--reference`` instead times QSGD, signSGD, RC-FED, mixed precision and LAQ (default
specs) against minimal vectorised hand-written references of the same quantizers on
ResNet-18-shaped random gradients, after asserting that both send the same bytes; it
prints the ratios compressor / reference of ``step`` and ``decode`` (interleaved rounds,
median of the pairs, 1 torch thread). Run it as
``OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0 .venv/bin/python benchmarks/compressors.py --reference --table``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import DEFENSES, create
from gia_bench.models import ModelSpec, build_model

EXTRA_SPECS = ["lqsgd:bits=8", "powersgd:rank=2"]
# Reference figures (shared/ANCHORS.md): what the ResNet-18 rows must reproduce.
ANCHORS = {"resnet18": {"params": 11_181_642, "tensors": 62, "fp32_bytes": 44_726_568, "powersgd_rank2_bytes": 330_000}}


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    # torchvision draws initial weights from the global generator; fork it to leave it untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "resnet18": lambda: _seeded(0, lambda: torchvision.models.resnet18(num_classes=10)),
    "lenet": lambda: build_model(ModelSpec("lenet", (3, 32, 32), 10), seed=0),
}


def gradients(model_name: str, batch: int, device: torch.device) -> list[torch.Tensor]:
    """The cross-entropy gradient of a seeded model on a seeded batch of 32x32 RGB images."""
    model = MODELS[model_name]().to(device).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    loss = F.cross_entropy(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_step_bytes(spec: str, grads: list[torch.Tensor]) -> int:
    comm = LocalCommunicator(record=False)
    create(spec).step([g.clone() for g in grads], comm)
    return comm.bytes_sent


def measure(spec: str, grads: list[torch.Tensor], repeats: int, device: torch.device) -> dict:
    """Bytes of the first step, then median step / decode times over ``repeats`` further steps."""
    comp = create(spec)
    shapes = [g.shape for g in grads]
    comm = LocalCommunicator(record=True)
    comp.step([g.clone() for g in grads], comm)  # first step: the bytes, and the warm-up
    row = {
        "name": spec,
        "spec": comp.spec,
        "bytes": comm.bytes_sent,
        "messages": {m.tag: m.nbytes for m in comm.messages},
    }
    step_ms, decode_ms, later_bytes = [], [], []
    for _ in range(repeats):
        inputs = [g.clone() for g in grads]
        comm = LocalCommunicator(record=True)
        _sync(device)
        t0 = time.perf_counter()
        comp.step(inputs, comm)
        _sync(device)
        t1 = time.perf_counter()
        comp.decode(messages_by_tag(comm.messages), shapes, comp.public_state())
        _sync(device)
        t2 = time.perf_counter()
        step_ms.append(1e3 * (t1 - t0))
        decode_ms.append(1e3 * (t2 - t1))
        later_bytes.append(comm.bytes_sent)
    row["step_ms"] = round(statistics.median(step_ms), 2)
    row["decode_ms"] = round(statistics.median(decode_ms), 2)
    row["step_decode_ms"] = round(statistics.median(a + b for a, b in zip(step_ms, decode_ms)), 2)
    if any(b != row["bytes"] for b in later_bytes):  # adaptive compressors (skipped rounds, ...)
        row["later_bytes_min"], row["later_bytes_max"] = min(later_bytes), max(later_bytes)
    return row


def specs_to_run() -> list[str]:
    """Every registered compressor at its default spec, then the extra specs; duplicates dropped.

    An extra spec equal to a default one takes that row's place (it names the setting asked for).
    """
    names = DEFENSES.names()
    extras = [s for s in EXTRA_SPECS if s.split(":")[0] in names]
    label: dict[str, str] = {}  # canonical spec -> how the row names it
    for spec in names:
        label.setdefault(create(spec).spec, spec)
    for spec in extras:
        label[create(spec).spec] = spec
    specs = list(dict.fromkeys(label[create(spec).spec] for spec in names + extras))
    return specs


def run(models: list[str], repeats: int, batch: int, device: torch.device) -> dict:
    result: dict = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "batch": batch,
        "models": {},
        "rows": [],
    }
    specs = specs_to_run()
    registered = set(DEFENSES.names())
    for model_name in models:
        grads = gradients(model_name, batch, device)
        fp32 = sum(g.numel() * 4 for g in grads)
        info = {"params": sum(g.numel() for g in grads), "tensors": len(grads), "fp32_bytes": fp32}
        if model_name in ANCHORS:
            info["anchors"] = ANCHORS[model_name]
        result["models"][model_name] = info
        powersgd_bytes: dict[int, int] = {}
        for spec in specs:
            row: dict = {"model": model_name}
            try:
                row.update(measure(spec, grads, repeats, device))
            except Exception as exc:  # one broken compressor must not hide the others' figures
                row.update({"name": spec, "error": f"{type(exc).__name__}: {exc}"})
                result["rows"].append(row)
                continue
            row["fraction_of_fp32"] = row["bytes"] / fp32
            row["times_smaller"] = round(fp32 / row["bytes"], 2) if row["bytes"] else None
            comp = create(spec)
            if comp.registry_name == "lqsgd" and "powersgd" in registered and hasattr(comp, "rank"):
                rank = int(comp.rank)
                if rank not in powersgd_bytes:
                    powersgd_bytes[rank] = first_step_bytes(f"powersgd:rank={rank}", grads)
                row["powersgd_bytes_same_rank"] = powersgd_bytes[rank]
                row["ratio_to_powersgd"] = row["bytes"] / powersgd_bytes[rank]
            result["rows"].append(row)
    return result


def markdown(result: dict) -> str:
    lines = [
        "| model | compressor | bytes/step | x smaller than fp32 | step ms | decode ms | vs PowerSGD same rank |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | `{r['name']}` | error: {r['error']} | | | | |")
            continue
        vs = f"{r['ratio_to_powersgd']:.3f}" if "ratio_to_powersgd" in r else ""
        lines.append(
            f"| {r['model']} | `{r['name']}` | {r['bytes']:,} | {r['times_smaller']} | "
            f"{r['step_ms']} | {r['decode_ms']} | {vs} |"
        )
    return "\n".join(lines)


# -- --reference: each quantizer against a minimal vectorised hand-written version -----------------
#
# Every reference below is the same quantizer written as plain flat tensor code (one buffer for
# all tensors, cached index tensors where a quantity is per bucket / per tensor, numpy's
# packbits for the bit streams), producing the SAME message bytes as the compressor on the
# same input and seed: :func:`reference_table` asserts byte-equality before timing anything.
# Ratios only (compressor time / reference time, interleaved rounds, median of the pairs):
# on a shared, loaded machine absolute times mean nothing.

REFERENCE_SPECS = ["qsgd", "signsgd", "rcfed", "mixedprec", "laq"]


def resnet18_shaped(seed: int = 0) -> list[torch.Tensor]:
    """Random gradients with the parameter shapes of torchvision's ``resnet18(num_classes=10)``."""
    with torch.device("meta"):
        shapes = [p.shape for p in torchvision.models.resnet18(num_classes=10).parameters()]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def _np_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The codec's layout (code i at stream bits [i b, (i+1) b), LSB first) by numpy bit tables."""
    c = codes.reshape(-1).to(torch.uint8).numpy()
    if bits == 8:
        return torch.from_numpy(c.copy())
    planes = np.unpackbits(c[:, None], axis=1, count=bits, bitorder="little")
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def _np_unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_np_pack` (bits <= 8): uint8 codes."""
    p = packed.reshape(-1).numpy()
    if bits == 8:
        return torch.from_numpy(p[:n].copy())
    planes = np.unpackbits(p, count=n * bits, bitorder="little").reshape(n, bits)
    return torch.from_numpy(np.packbits(planes, axis=1, bitorder="little").reshape(-1))


class _Flat:
    """Cached flat layout of a list of shapes: sizes, per-entry tensor id, offsets."""

    def __init__(self, shapes: list[torch.Size]) -> None:
        self.shapes = shapes
        self.sizes = [int(s.numel()) for s in shapes]
        self.n = sum(self.sizes)
        self.tensor_of = torch.repeat_interleave(torch.arange(len(shapes)), torch.tensor(self.sizes))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [c.view(s) for c, s in zip(torch.split(flat, self.sizes), self.shapes)]


class RefQSGD:
    """QSGD (Alistarh et al. 2017, section 3.1): padded bucket matrix, one norm per row."""

    def __init__(self, shapes: list[torch.Size], levels: int = 16, bucket: int = 512, seed: int = 0) -> None:
        self.flat, self.levels, self.bucket, self.seed = _Flat(shapes), levels, bucket, seed
        rows = [-(-n // bucket) for n in self.flat.sizes]
        starts = np.cumsum([0] + rows[:-1]) * bucket
        self.pos = torch.cat([int(s) + torch.arange(n) for s, n in zip(starts, self.flat.sizes)])
        self.rows = sum(rows)
        self.bucket_of = self.pos // bucket
        self.bits = levels.bit_length()

    def step(self, grads: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        v = torch.cat([g.reshape(-1) for g in grads])
        padded = v.new_zeros(self.rows * self.bucket)
        padded[self.pos] = v
        norms = torch.linalg.vector_norm(padded.view(self.rows, self.bucket), dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        r = (padded.abs().view(self.rows, self.bucket) / safe[:, None] * self.levels).view(-1)[self.pos]
        level = torch.floor(r + torch.rand(v.numel(), generator=gen)).clamp_(0, self.levels)
        negative = v < 0
        msgs = {
            "norms": norms,
            "signs": torch.from_numpy(np.packbits(negative.numpy(), bitorder="little")),
            "levels": _np_pack(level, self.bits),
        }
        mag = norms[self.bucket_of] * (level / self.levels)
        return msgs, self.flat.split(torch.where(negative, -mag, mag))

    def decode(self, msgs: dict) -> list[torch.Tensor]:
        n = self.flat.n
        negative = torch.from_numpy(np.unpackbits(msgs["signs"].numpy(), count=n, bitorder="little")).bool()
        level = _np_unpack(msgs["levels"], self.bits, n).to(torch.float32)
        mag = msgs["norms"][self.bucket_of] * (level / self.levels)
        return self.flat.split(torch.where(negative, -mag, mag))


class RefSignSGD:
    """EF-SignSGD (Karimireddy et al. 2019, Alg. 1): flat buffer, per-tensor scales by index_add."""

    def __init__(self, shapes: list[torch.Size]) -> None:
        self.flat = _Flat(shapes)
        self.count = torch.tensor(self.flat.sizes, dtype=torch.float32)
        self.residual: torch.Tensor | None = None

    def step(self, grads: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        p = torch.cat([g.reshape(-1) for g in grads])
        if self.residual is not None:
            p = p + self.residual
        scales = torch.stack([x.abs().mean() for x in torch.split(p, self.flat.sizes)])
        negative = p < 0
        per_entry = scales[self.flat.tensor_of]
        sent = torch.where(negative, -per_entry, per_entry)
        self.residual = p - sent
        msgs = {"signs": torch.from_numpy(np.packbits(negative.numpy(), bitorder="little")), "scales": scales}
        return msgs, self.flat.split(sent)

    def decode(self, msgs: dict) -> list[torch.Tensor]:
        bits = np.unpackbits(msgs["signs"].numpy(), count=self.flat.n, bitorder="little")
        per_entry = msgs["scales"][self.flat.tensor_of]
        return self.flat.split(torch.where(torch.from_numpy(bits).bool(), -per_entry, per_entry))


class RefRCFED:
    """RC-FED (Hamidi & Bereyhi): normalise, one bucketize over the flat buffer, range-code (constriction)."""

    def __init__(self, shapes: list[torch.Size], bits: int = 4, rate: float = 2.0) -> None:
        from gia_bench.defenses.rcfed import design_quantizer

        self.flat, self.bits = _Flat(shapes), bits
        d = design_quantizer(bits, rate)
        self.levels = torch.tensor(d.levels, dtype=torch.float32)
        self.thresholds = torch.tensor(d.thresholds, dtype=torch.float32)
        self.active = torch.tensor(d.active, dtype=torch.int64)

    def step(self, grads: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        import constriction

        x = torch.cat([g.reshape(-1) for g in grads])
        stats = torch.stack([torch.stack([t.mean(), t.std(unbiased=False)]) for t in torch.split(x, self.flat.sizes)])
        mu, sigma = stats[:, 0], stats[:, 1]
        z = (x - mu[self.flat.tensor_of]) / torch.where(sigma > 0, sigma, torch.ones_like(sigma))[self.flat.tensor_of]
        codes = self.active[torch.bucketize(z, self.thresholds)]
        counts = torch.bincount(codes, minlength=2**self.bits).to(torch.int32)
        enc = constriction.stream.queue.RangeEncoder()
        model = constriction.stream.model.Categorical(counts.numpy().astype(np.float64), perfect=False)
        enc.encode(codes.numpy().astype(np.int32), model)
        stream = torch.from_numpy(enc.get_compressed().astype("<u4").view(np.uint8).copy())
        msgs = {"stats": stats, "counts": counts, "length": torch.tensor([stream.numel()]), "stream": stream}
        return msgs, self.flat.split(self.levels[codes] * sigma[self.flat.tensor_of] + mu[self.flat.tensor_of])

    def decode(self, msgs: dict) -> list[torch.Tensor]:
        import constriction

        model = constriction.stream.model.Categorical(msgs["counts"].numpy().astype(np.float64), perfect=False)
        words = msgs["stream"][: int(msgs["length"][0])].numpy().view("<u4").astype(np.uint32)
        codes = torch.from_numpy(constriction.stream.queue.RangeDecoder(words).decode(model, self.flat.n).astype(np.int64))
        stats = msgs["stats"]
        t = self.flat.tensor_of
        return self.flat.split(self.levels[codes] * stats[t, 1] + stats[t, 0])


class RefMixedPrecision:
    """Mixed precision (Ovi et al. 2023), uniform stochastic codec: per-entry scale and bits by index."""

    def __init__(self, shapes: list[torch.Size], bits: list[int], seed: int = 0) -> None:
        self.flat, self.bits, self.seed = _Flat(shapes), bits, seed
        self.top = torch.tensor([2.0**b - 1 for b in bits])[self.flat.tensor_of]
        self.widths = sorted(set(bits))

    def step(self, grads: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.cat([g.reshape(-1) for g in grads])
        scales = torch.stack([t.abs().max() for t in torch.split(x, self.flat.sizes)])
        s = torch.where(scales > 0, scales, torch.ones_like(scales))[self.flat.tensor_of]
        u = torch.rand(x.numel(), generator=gen)
        codes = torch.minimum(torch.floor((x / s + 1) / 2 * self.top + u).clamp_(min=0), self.top).to(torch.uint8)
        packed = [_np_pack(c, b) for c, b in zip(torch.split(codes, self.flat.sizes), self.bits)]
        msgs = {"codes": torch.cat(packed), "scales": scales}
        values = (codes.to(torch.float32) / self.top * 2 - 1) * scales[self.flat.tensor_of]
        return msgs, self.flat.split(values)

    def decode(self, msgs: dict) -> list[torch.Tensor]:
        nbytes = [-(-n * b // 8) for n, b in zip(self.flat.sizes, self.bits)]
        parts = torch.split(msgs["codes"], nbytes)
        codes = torch.cat([_np_unpack(p, b, n) for p, b, n in zip(parts, self.bits, self.flat.sizes)])
        values = (codes.to(torch.float32) / self.top * 2 - 1) * msgs["scales"][self.flat.tensor_of]
        return self.flat.split(values)


class RefLAQ:
    """LAQ (Sun et al. 2019, Eq. 3-4, 7), a sending round from a fresh state: one flat innovation.

    With the skip rule's quantities (``||dQ||^2``, ``||eps||^2``, ``||Q||^2`` for the
    model-change history) and the new stale copy kept, as LAQ must.
    """

    def __init__(self, shapes: list[torch.Size], bits: int = 8) -> None:
        self.flat, self.bits = _Flat(shapes), bits

    def step(self, grads: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        g = torch.cat([t.reshape(-1) for t in grads])
        last = torch.zeros_like(g)
        top = 2**self.bits - 1
        radius = (g - last).abs().max()
        step = 2 * radius / top
        codes = torch.floor((g - last + radius) / torch.where(step > 0, step, torch.ones_like(step)) + 0.5)
        codes = codes.clamp_(0, top).to(torch.uint8)
        dq = codes.to(torch.float32) * (2 * radius / top) - radius
        q = last + dq
        self.skip_terms = (float(dq.pow(2).sum()), float((q - g).pow(2).sum()), float(q.pow(2).sum()))
        self.state = q
        msgs = {"flag": torch.ones(1, dtype=torch.uint8), "codes": _np_pack(codes, self.bits), "radius": radius.reshape(1)}
        return msgs, self.flat.split(q)

    def decode(self, msgs: dict, last: torch.Tensor) -> list[torch.Tensor]:
        codes = _np_unpack(msgs["codes"], self.bits, self.flat.n).to(torch.float32)
        r = msgs["radius"].reshape(())
        return self.flat.split(last.reshape(-1) + (codes * (2 * r / (2**self.bits - 1)) - r))


def _reference_for(name: str, comp, shapes: list[torch.Size]):
    if name == "qsgd":
        return RefQSGD(shapes, comp.levels, comp.bucket, comp.seed)
    if name == "signsgd":
        return RefSignSGD(shapes)
    if name == "rcfed":
        return RefRCFED(shapes, comp.bits, comp.rate)
    if name == "mixedprec":
        if comp.mode != "uniform" or not comp.stochastic:
            raise ValueError("the mixedprec reference covers mode=uniform, stochastic=True (the default)")
        return RefMixedPrecision(shapes, comp.assign_bits(list(range(len(shapes)))), comp.seed)
    if name == "laq":
        return RefLAQ(shapes, comp.bits)
    raise ValueError(f"no reference for {name!r}")


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median_ratio(a: Callable[[], object], b: Callable[[], object], rounds: int) -> dict:
    """Interleaved A/B rounds (order alternating), median of the per-round ratios a/b."""
    a(), b()  # warm-up (caches, allocator)
    ratios = []
    for i in range(rounds):
        if i % 2:
            tb, ta = _timed(b), _timed(a)
        else:
            ta, tb = _timed(a), _timed(b)
        ratios.append(ta / tb)
    ratios.sort()
    return {"ratio": round(statistics.median(ratios), 3), "min": round(ratios[0], 3), "max": round(ratios[-1], 3)}


def _assert_same(name: str, ours: dict, ref: dict, out_c: list, out_r: list) -> None:
    for tag, t in ref.items():
        if tag not in ours:
            raise AssertionError(f"{name}: the compressor sent no {tag!r}")
        a, b = ours[tag].reshape(-1), t.reshape(-1)
        if a.dtype != b.dtype or a.numel() != b.numel() or a.view(torch.uint8).ne(b.view(torch.uint8)).any():
            raise AssertionError(f"{name}: message {tag!r} differs from the reference's bytes")
    if set(ours) != set(ref):
        raise AssertionError(f"{name}: messages {sorted(ours)} vs the reference's {sorted(ref)}")
    for x, y in zip(out_c, out_r):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def reference_table(rounds: int = 7, seed: int = 0) -> dict:
    """Compressor / reference time of step and decode on ResNet-18-shaped gradients, bytes checked equal."""
    grads = resnet18_shaped(seed)
    shapes = [g.shape for g in grads]
    rows = []
    for name in REFERENCE_SPECS:
        if name not in DEFENSES.names():
            continue
        comp = create(name)
        ref = _reference_for(name, comp, shapes)
        # same input, same seed: the messages must be byte for byte the reference's
        comm = LocalCommunicator(record=True)
        out_c = comp.step([g.clone() for g in grads], comm)
        ours = messages_by_tag(comm.messages)
        public = comp.public_state()
        theirs, out_r = ref.step([g.clone() for g in grads])
        _assert_same(name, ours, theirs, out_c, out_r)
        dec_c = comp.decode(ours, shapes, public)
        dec_r = ref.decode(theirs, public["last"]) if name == "laq" else ref.decode(theirs)
        for x, y in zip(dec_c, dec_r):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        if name == "signsgd":  # a second step with the residual carried: still the same bytes
            comm = LocalCommunicator(record=True)
            comp.step([g.clone() for g in grads], comm)
            theirs2, _ = ref.step([g.clone() for g in grads])
            _assert_same(name, messages_by_tag(comm.messages), theirs2, [], [])

        def fresh_step(c=comp):
            # stateful rounds (LAQ's skip rule, signSGD's residual) start from the same state each time
            c_ = create(c.spec) if name in ("laq", "signsgd") else c
            c_.step([g for g in grads], LocalCommunicator(record=False))

        def ref_step(r=ref):
            r_ = _reference_for(name, comp, shapes) if name in ("laq", "signsgd") else r
            r_.step([g for g in grads])

        row = {"name": name, "spec": comp.spec, "bytes": sum(t.numel() * t.element_size() for t in ours.values())}
        row["step"] = _median_ratio(fresh_step, ref_step, rounds)
        ref_decode = (lambda: ref.decode(theirs, public["last"])) if name == "laq" else (lambda: ref.decode(theirs))
        row["decode"] = _median_ratio(lambda: comp.decode(ours, shapes, public), ref_decode, rounds)
        rows.append(row)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "gradients": {"shapes": "resnet18(num_classes=10)", "params": sum(g.numel() for g in grads), "tensors": len(grads)},
        "reference": rows,
    }


def reference_markdown(result: dict) -> str:
    lines = ["| compressor | bytes/step | step / reference | decode / reference |", "|---|---:|---:|---:|"]
    for r in result["reference"]:
        s, d = r["step"], r["decode"]
        lines.append(
            f"| `{r['spec']}` | {r['bytes']:,} | {s['ratio']:.2f}x ({s['min']:.2f}-{s['max']:.2f}) |"
            f" {d['ratio']:.2f}x ({d['min']:.2f}-{d['max']:.2f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, batch 2 (a fast smoke run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per compressor (median), >= 1")
    parser.add_argument("--batch", type=int, default=8, help="images per batch, >= 2 (BatchNorm in train mode)")
    parser.add_argument("--models", default="resnet18,lenet", help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--device", default="cpu", help="torch device for gradients and compressors")
    parser.add_argument("--table", action="store_true", help="also print a Markdown table on stderr")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="instead: compressor / minimal vectorised reference time ratios (qsgd, signsgd, rcfed, mixedprec,"
        " laq; ResNet-18-shaped gradients, 1 torch thread, same bytes asserted)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="--reference: interleaved A/B rounds (median), >= 1")
    args = parser.parse_args(argv)
    if args.reference:
        if args.rounds < 1:
            parser.error(f"--rounds must be >= 1, got {args.rounds}")
        torch.set_num_threads(1)
        result = reference_table(args.rounds)
        print(json.dumps(result, indent=1))
        if args.table:
            print(reference_markdown(result), file=sys.stderr)
        return
    if args.quick:
        args.repeats, args.batch = 2, 2
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.batch < 2:
        parser.error(f"--batch must be >= 2 (ResNet-18's BatchNorm in train mode), got {args.batch}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; accepted: {', '.join(MODELS)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    result = run(models, args.repeats, args.batch, device)
    print(json.dumps(result, indent=1))
    if args.table:
        print(markdown(result), file=sys.stderr)


if __name__ == "__main__":
    main()
