"""Mixed-precision quantization as a leakage defense (Ovi, Dey, Roy, Gangopadhyay 2023).

Ovi et al. ("Mixed Quantization Enabled Federated Learning to Tackle Gradient
Inversion Attacks", CVPR-W 2023) quantize different layers of the update at
different precisions, the point being that the layers an inversion attack relies
on most (the first ones, whose gradients are closest to the input) can be sent
at the fewest bits while the rest keep enough precision to train.

Here every gradient tensor gets a bit width from the ``bits_per_layer`` spec
(mini-syntax below) and is quantized on its own scale ``s = max|g|`` with the
project's uniform or log codec (:mod:`gia_bench.defenses.codecs`); ``32`` sends
the tensor as fp32. Codes of b bits are packed b bits each, per tensor (a
tensor's codes start on a byte boundary), so a tensor of n values costs
``ceil(n b / 8)`` bytes plus its 4-byte scale.

Collectives per step: codes are not linear, so ``"codes"`` (uint8) and
``"scales"`` (fp32, one per quantized tensor) are exchanged with ``all_gather``
and every worker decodes and averages them; fp32 tensors go in one
``all_reduce`` (``"fp32"``). A message is only sent when it has content.

The bit assignment is public (the receiver knows the spec and the parameter
names): :meth:`MixedPrecision.public_state` returns it as ``"bits"`` (int32, one
per tensor) and :meth:`MixedPrecision.decode` reads it from there; it is not sent.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

import torch

from gia_bench.comm import Communicator
from gia_bench.defenses.base import (
    Compressor,
    GeneratorState,
    check_messages,
    flatten,
    make_generator,
    register,
    resolve_keys,
)
from gia_bench.defenses.codecs import (
    log_dequantize,
    log_quantize,
    pack_bits,
    packed_nbytes,
    uniform_dequantize,
    uniform_quantize,
    unpack_bits,
)
from gia_bench.errors import CompressorError, SpecError

FULL_PRECISION = 32
_POSITION = re.compile(r"^-?\d+$")
_RANGE = re.compile(r"^(\d+)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """One ``selector@bits`` entry of a ``bits_per_layer`` spec."""

    selector: str
    bits: int

    def matches(self, position: int, name: str, count: int) -> bool:
        """Does this rule select the tensor at ``position`` (of ``count``) named ``name``?"""
        if _POSITION.match(self.selector):
            want = int(self.selector)
            return position == (want if want >= 0 else count + want)
        span = _RANGE.match(self.selector)
        if span:
            return int(span.group(1)) <= position <= int(span.group(2))
        return fnmatch.fnmatchcase(name, self.selector)

    @property
    def is_name_pattern(self) -> bool:
        return not (_POSITION.match(self.selector) or _RANGE.match(self.selector) or self.selector == "*")


def parse_bits_per_layer(text: str, mode: str) -> tuple[LayerRule, ...]:
    """Parse ``selector@bits/selector@bits/...`` (``:`` is accepted in place of ``@``).

    A selector is a position (``0``, ``-1`` for the last tensor), an inclusive range
    of positions (``0-3``), or an fnmatch pattern on the parameter name
    (``conv1.*``, ``*.bias``, ``*``). The first rule that matches a tensor gives its
    bits; every tensor must be matched by some rule (end with ``*@b`` for a default).
    """
    rules = []
    low = 2 if mode == "log" else 1
    for entry in filter(None, (e.strip() for e in text.split("/"))):
        selector, sep, bits_text = entry.replace(":", "@").rpartition("@")
        if not sep or not selector:
            raise SpecError(f"mixedprec bits_per_layer: {entry!r} is not of the form selector@bits")
        try:
            bits = int(bits_text)
        except ValueError:
            raise SpecError(f"mixedprec bits_per_layer: bits {bits_text!r} in {entry!r} is not an integer") from None
        if bits != FULL_PRECISION and not low <= bits <= 16:
            raise SpecError(
                f"mixedprec bits_per_layer: {bits} bits in {entry!r} is out of range"
                f" ({low}..16 for mode={mode}, or 32 for fp32)"
            )
        rules.append(LayerRule(selector, bits))
    if not rules:
        raise SpecError("mixedprec bits_per_layer: empty; expected e.g. '0-1@4/*@8'")
    return tuple(rules)


@register("mixedprec")
class MixedPrecision(GeneratorState, Compressor):
    """Mixed-precision quantization: each layer at its own bit width (Ovi et al. 2023).

    Args:
        bits_per_layer: '/'-separated rules selector@bits, first match wins. A selector is a
            position (0, -1), a range of positions (0-3) or an fnmatch pattern on the parameter
            name (conv1.*, *.bias, *); bits 1..16 (2..16 for log), or 32 to send fp32.
            Positions index the list given to step (the whole model in capture).
            Example: 0-1@2/features.*@4/*@8.
        mode: codec of the quantized layers: uniform (symmetric, 2^b levels on [-s, s]) or log
            (sign + log magnitude, as LQ-SGD's codec).
        stochastic: stochastic rounding (unbiased for uniform; unbiased in the log domain for log)
            instead of round-to-nearest.
        alpha: log codec curvature (mode=log only).
        seed: seed of the rounding noise (each worker draws from seed + rank).
    """

    supports_simulate = True

    def __init__(
        self,
        bits_per_layer: str = "0-1@4/*@8",
        mode: Literal["uniform", "log"] = "uniform",
        stochastic: bool = True,
        alpha: float = 10.0,
        seed: int = 0,
    ) -> None:
        if mode not in ("uniform", "log"):
            raise SpecError(f"mixedprec mode: {mode!r} is not one of uniform, log")
        if not alpha > 0:
            raise SpecError(f"mixedprec alpha: must be > 0, got {alpha}")
        self.rules = parse_bits_per_layer(bits_per_layer, mode)
        # canonical form: '@' separators, so the spec survives any ':'-splitting tool
        self.bits_per_layer = "/".join(f"{r.selector}@{r.bits}" for r in self.rules)
        self.mode = mode
        self.stochastic = stochastic
        self.alpha = float(alpha)
        self.seed = int(seed)
        self._gen: torch.Generator | None = None  # made at the first step, on the gradients' device
        self._last_bits: list[int] = []

    # -- bit assignment ------------------------------------------------------------------------
    def assign_bits(self, keys: Sequence[Hashable]) -> list[int]:
        """Bits of each tensor: the first rule matching its position / name."""
        out = []
        for i, key in enumerate(keys):
            position = key if isinstance(key, int) else i
            name = str(key)
            for rule in self.rules:
                if rule.matches(position, name, len(keys)):
                    out.append(rule.bits)
                    break
            else:
                raise CompressorError(
                    f"mixedprec bits_per_layer {self.bits_per_layer!r}: no rule matches tensor {i} ({name!r});"
                    " end the spec with '*@bits' for a default"
                )
        return out

    def _bits_for(self, n: int, public: Mapping[str, torch.Tensor] | None) -> list[int]:
        if public is not None and "bits" in public:
            bits = [int(b) for b in public["bits"].reshape(-1).tolist()]
            if len(bits) != n:
                raise CompressorError(f"mixedprec: public 'bits' has {len(bits)} entries for {n} tensors")
            return bits
        if any(r.is_name_pattern for r in self.rules):
            raise CompressorError(
                f"mixedprec bits_per_layer {self.bits_per_layer!r} selects layers by name:"
                " the receiver needs public['bits'] (saved in every record)"
            )
        return self.assign_bits(list(range(n)))

    # -- codec ----------------------------------------------------------------------------------
    def _quantize(self, x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = self._gen if self.stochastic else None
        # a generator draws on its own device (a state resumed from another device keeps its stream)
        xq = x if gen is None else x.to(gen.device)
        if self.mode == "log":
            codes, scale = log_quantize(xq, bits, self.alpha, self.stochastic, gen)
        else:
            codes, scale = uniform_quantize(xq, bits, self.stochastic, gen)
        return codes.to(x.device), scale.to(x.device)

    def _dequantize(self, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        if self.mode == "log":
            return log_dequantize(codes, scale, bits, self.alpha)
        return uniform_dequantize(codes, scale, bits)

    def _decode_flat(
        self,
        codes: torch.Tensor | None,
        scales: torch.Tensor | None,
        fp32: torch.Tensor | None,
        shapes: Sequence[torch.Size],
        bits: Sequence[int],
    ) -> list[torch.Tensor]:
        """One worker's gradient from its codes / scales (and its fp32 part, if given)."""
        out: list[torch.Tensor] = []
        byte_at = value_at = scale_at = 0
        for shape, b in zip(shapes, bits):
            n = int(torch.Size(shape).numel())
            if b == FULL_PRECISION:
                out.append(fp32[value_at : value_at + n].to(torch.float32).reshape(shape))
                value_at += n
                continue
            nb = packed_nbytes(n, b)
            c = unpack_bits(codes[byte_at : byte_at + nb], b, n)
            out.append(self._dequantize(c, scales[scale_at], b).reshape(shape))
            byte_at += nb
            scale_at += 1
        return out

    @staticmethod
    def _layout(shapes: Sequence[torch.Size], bits: Sequence[int]) -> tuple[int, int, int]:
        """(code bytes, number of scales, fp32 values) the messages must hold."""
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        code_bytes = sum(packed_nbytes(n, b) for n, b in zip(sizes, bits) if b != FULL_PRECISION)
        n_scales = sum(1 for b in bits if b != FULL_PRECISION)
        n_fp32 = sum(n for n, b in zip(sizes, bits) if b == FULL_PRECISION)
        return code_bytes, n_scales, n_fp32

    # -- worker --------------------------------------------------------------------------------
    def step(
        self, grads: Sequence[torch.Tensor], comm: Communicator, keys: Sequence[Hashable] | None = None
    ) -> list[torch.Tensor]:
        if not grads:  # nothing to send: every rank sees the same empty list
            return []
        keys = resolve_keys(grads, keys)
        bits = self.assign_bits(keys)
        self._last_bits = bits
        if self.stochastic and self._gen is None:
            # workers must not share rounding noise, or their errors would not average out
            self._gen = make_generator(self.seed + comm.rank, grads[0].device)
        shapes = [g.shape for g in grads]
        packed, scales, raw = [], [], []
        for g, b in zip(grads, bits):
            if b == FULL_PRECISION:
                raw.append(g.detach().to(torch.float32).reshape(-1))
                continue
            codes, scale = self._quantize(g, b)
            packed.append(pack_bits(codes, b))
            scales.append(scale)
        device = grads[0].device if grads else torch.device("cpu")
        n = comm.world_size
        fp32_sum = None
        if raw:
            fp32_sum = comm.all_reduce(flatten(raw), "fp32").div_(n)
        gathered_codes: list[torch.Tensor | None] = [None] * n
        gathered_scales: list[torch.Tensor | None] = [None] * n
        if packed:
            gathered_codes = comm.all_gather(torch.cat(packed), "codes")
            gathered_scales = comm.all_gather(torch.cat(scales), "scales")
        decoded = [
            self._decode_flat(c, s, fp32_sum, shapes, bits) for c, s in zip(gathered_codes, gathered_scales)
        ]
        # mean over workers; fp32 tensors already hold the mean, identical in every worker's decode
        out = []
        for i, g in enumerate(grads):
            if bits[i] == FULL_PRECISION:
                out.append(decoded[0][i].to(g.dtype).to(device))
                continue
            total = decoded[0][i].clone()
            for w in decoded[1:]:
                total += w[i]
            out.append(total.div_(n).to(g.dtype).to(device))
        return out

    # -- receiver ------------------------------------------------------------------------------
    def public_state(self) -> dict[str, torch.Tensor]:
        return {"bits": torch.tensor(self._last_bits, dtype=torch.int32)}

    def decode(
        self,
        messages: Mapping[str, torch.Tensor],
        shapes: Sequence[torch.Size],
        public: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        bits = self._bits_for(len(shapes), public)
        code_bytes, n_scales, n_fp32 = self._layout(shapes, bits)
        needed = (["codes", "scales"] if n_scales else []) + (["fp32"] if n_fp32 else [])
        check_messages(messages, needed, "mixedprec")
        codes = messages["codes"].reshape(-1) if n_scales else None
        scales = messages["scales"].reshape(-1).to(torch.float32) if n_scales else None
        fp32 = messages["fp32"].reshape(-1) if n_fp32 else None
        for name, t, want in (("codes", codes, code_bytes), ("scales", scales, n_scales), ("fp32", fp32, n_fp32)):
            if t is not None and t.numel() != want:
                raise CompressorError(f"mixedprec: message {name!r} has {t.numel()} entries, the layout needs {want}")
        return self._decode_flat(codes, scales, fp32, shapes, bits)

    # -- compressor-aware attacker ----------------------------------------------------------------
    def message_values(self, messages, shapes, public=None) -> dict[str, torch.Tensor]:
        return {"grads": flatten(self.decode(messages, shapes, public))}

    def simulate(self, grads, messages, public=None) -> dict[str, torch.Tensor]:
        """Nearest-rounded quantize/dequantize per layer, straight-through.

        With ``stochastic=True`` the worker's rounding noise is private, so the
        attacker matches the nearest-rounded value (the closest deterministic
        stand-in; for the uniform codec it is within half a step of the mean).
        """
        bits = self._bits_for(len(grads), public)
        parts = []
        for g, b in zip(grads, bits):
            x = g.reshape(-1).to(torch.float32)
            if b == FULL_PRECISION:
                parts.append(x)
                continue
            if self.mode == "log":
                codes, scale = log_quantize(x, b, self.alpha)
            else:
                codes, scale = uniform_quantize(x, b)
            q = self._dequantize(codes, scale, b)
            parts.append(x + (q - x).detach())
        return {"grads": torch.cat(parts) if parts else torch.zeros(0)}
