"""Every restart's parameter gradient from one batched pass: per-restart weights, im2col products.

R restarts of a gradient-matching attack each need the gradient of their own loss with
respect to the (shared) weights, kept differentiable in their own dummy inputs. The
``loop`` route takes one autograd pass per restart. This route runs the R candidate
batches through the model as one batch of R*B samples, with every parameterised layer
reading a per-restart copy of its parameters, ``W_r`` (one leaf of shape (R, *W.shape),
all copies equal to W). Restart r's loss touches only copy r, so

    d(sum_r L_r) / dW_r = dL_r / dW          (exactly, for every r)

and one ``autograd.grad(..., create_graph=True)`` gives all R gradients. Layers are
written as batched matrix products so that each restart's weight gradient, and its
double backward, are one ``bmm`` over the R restarts:

* ``Conv2d``: im2col (``F.unfold``) then ``einsum('rok,rbkl->rbol')`` (Chellapilla et
  al. 2006's convolution as a matrix product);
* ``Linear``: ``einsum('rbi,roi->rbo')``;
* ``BatchNorm``: in eval mode the running statistics normalise and the affine is per
  restart; in train mode each restart's statistics are taken over its own B samples (the
  statistics the restart would see alone);
* parameter-free per-sample layers (activations, pooling, flatten, residual sums in a
  known block) run on the flat (R*B, ...) tensor.

A model is supported only if every module in it is of a type listed here, containers
included (a container's ``forward`` could mix samples across the batch, e.g. ``x.mean(0)``):
anything else makes :func:`unsupported` name it, and the caller falls back to the loop,
so the route is never silently wrong. Measured against the loop in
``benchmarks/attacks.py --sections restarts``.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from gia_bench import models

#: Layers that act on each sample alone and hold no parameters: they run on the flat batch as they are.
PER_SAMPLE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Identity, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
#: Containers whose ``forward`` only calls children and per-sample ops (read, not assumed).
CONTAINERS = (
    nn.Sequential, models.LeNet, models.ConvNet, models.ResNet18, models.MLP,
    torchvision.models.resnet.ResNet, torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck,
)  # fmt: skip


#: Where ``auto`` takes this route on the CPU: model class -> the largest batch size measured faster
#: than the loop (4 restarts, 1 thread, ``benchmarks/attacks.py --sections restarts`` and the README).
#: ResNet-18 at B = 2 and 4, ConvNet (its 32x32 maps with 128-256 channels make im2col costly), the MLP
#: and LeNet at B = 8 measured slower, so they keep the loop.
FASTER_ON_CPU: dict[type[nn.Module], int] = {models.LeNet: 4, models.ResNet18: 1}


def faster_on_cpu(model: nn.Module, batch_size: int | None) -> bool:
    """Whether this route was measured faster than the loop on the CPU for ``model`` at ``batch_size``
    (whether it can compute the model is :func:`unsupported`'s question, asked once by the caller)."""
    limit = FASTER_ON_CPU.get(type(model))
    return limit is not None and batch_size is not None and batch_size <= limit


def unsupported(model: nn.Module) -> str | None:
    """Why the batched route cannot compute ``model``'s per-restart gradients exactly (None: it can)."""
    for name, m in model.named_modules():
        where = name or type(model).__name__
        if type(m) in CONTAINERS or type(m) in PER_SAMPLE:
            if any(True for _ in m.parameters(recurse=False)):
                return f"{where}: a {type(m).__name__} with parameters of its own"
            continue
        if type(m) is nn.Dropout:
            if m.training and m.p > 0:
                return f"{where}: Dropout in train mode draws masks per call"
            continue
        if type(m) is nn.Conv2d:
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                return f"{where}: Conv2d with groups, padding mode or string padding"
            continue
        if type(m) is nn.Linear:
            continue
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
            continue
        return f"{where}: {type(m).__name__} is not a layer the batched route knows"
    return None


def _conv2d(m: nn.Conv2d, x: torch.Tensor, p: dict[str, torch.Tensor], R: int) -> torch.Tensor:
    N, _, H, W = x.shape
    cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, C*kh*kw, L)
    h = (H + 2 * m.padding[0] - m.dilation[0] * (m.kernel_size[0] - 1) - 1) // m.stride[0] + 1
    w = (W + 2 * m.padding[1] - m.dilation[1] * (m.kernel_size[1] - 1) - 1) // m.stride[1] + 1
    weight = p["weight"].flatten(2)  # (R, O, C*kh*kw)
    out = torch.einsum("rok,rbkl->rbol", weight, cols.view(R, N // R, *cols.shape[1:]))
    if "bias" in p:
        out = out + p["bias"].view(R, 1, -1, 1)
    return out.reshape(N, -1, h, w)


def _linear(m: nn.Linear, x: torch.Tensor, p: dict[str, torch.Tensor], R: int) -> torch.Tensor:
    lead = x.shape[:-1]
    out = torch.einsum("rbi,roi->rbo", x.reshape(R, -1, x.shape[-1]), p["weight"])
    if "bias" in p:
        out = out + p["bias"].unsqueeze(1)
    return out.reshape(*lead, -1)


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, p: dict[str, torch.Tensor], R: int) -> torch.Tensor:
    # F.batch_norm's choice: batch statistics in training or without running statistics
    batch_stats = m.training or m.running_mean is None
    shape = (R, x.shape[0] // R, *x.shape[1:])  # (R, B, C, *spatial)
    if batch_stats:
        xr = x.reshape(shape)
        dims = [1, *range(3, xr.dim())]
        if xr[:, :, 0].numel() // R == 1:  # as F.batch_norm refuses it
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(shape[1:])}")
        var, mean = torch.var_mean(xr, dim=dims, correction=0, keepdim=True)
        xr = (xr - mean) * torch.rsqrt(var + m.eps)
    else:
        xr = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps).reshape(shape)
    if "weight" in p:
        affine = (R, 1, -1, *([1] * (xr.dim() - 3)))
        xr = xr * p["weight"].view(affine) + p["bias"].view(affine)
    return xr.reshape(x.shape)


_LAYERS: dict[type, Callable[..., torch.Tensor]] = {
    nn.Conv2d: _conv2d, nn.Linear: _linear, nn.BatchNorm1d: _batch_norm, nn.BatchNorm2d: _batch_norm,
}  # fmt: skip


class BatchedRestartGradients:
    """``(x, y) -> [(R, *param.shape)]``: each restart's mean cross-entropy gradient, one batched pass.

    The same contract as :class:`gia_bench.attacks.matching.CandidateGradients` (x (R, B, C, H, W),
    y (R, B) class indices or (R, B, K) probabilities; differentiable in x). Build it only for a
    model :func:`unsupported` accepts.
    """

    def __init__(self, model: nn.Module, param_names: tuple[str, ...] | list[str]):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"batched restarts: {reason}")
        self.model = model
        self.names = list(param_names)
        self.layers = [(m, _LAYERS[type(m)]) for m in model.modules() if type(m) in _LAYERS]
        self.owner = {f"{n}.{k}" if n else k: (m, k) for n, m in model.named_modules() for k, _ in m.named_parameters(recurse=False)}
        if set(self.names) - set(self.owner):
            raise ValueError(f"batched restarts: unknown parameter(s) {sorted(set(self.names) - set(self.owner))}")

    @contextmanager
    def _per_restart(self, R: int, copies: dict[str, torch.Tensor]) -> Iterator[None]:
        """Point every parameterised layer's forward at its per-restart copies while the pass runs."""
        by_module: dict[nn.Module, dict[str, torch.Tensor]] = {}
        for qual, (m, k) in self.owner.items():
            tensor = copies.get(qual)
            if tensor is None:  # a parameter outside the record: shared, no gradient asked for
                tensor = getattr(m, k).detach().unsqueeze(0).expand(R, *getattr(m, k).shape)
            by_module.setdefault(m, {})[k] = tensor
        saved = {m: m.__dict__["forward"] for m, _ in self.layers if "forward" in m.__dict__}
        try:
            for m, fn in self.layers:
                m.forward = types.MethodType(lambda mod, x, _fn=fn: _fn(mod, x, by_module.get(mod, {}), R), m)
            yield
        finally:  # the model as it was, an instance's own forward included
            for m, _ in self.layers:
                m.__dict__.pop("forward", None)
                if m in saved:
                    m.forward = saved[m]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        R, B = x.shape[:2]
        # One leaf per parameter holding R equal copies (an expanded view: no memory per restart).
        copies = {
            n: getattr(*self.owner[n]).detach().unsqueeze(0).expand(R, *getattr(*self.owner[n]).shape).requires_grad_()
            for n in self.names
        }
        with self._per_restart(R, copies):
            logits = self.model(x.reshape(R * B, *x.shape[2:]))
        target = y.reshape(R * B, *y.shape[2:])
        # the sum of the per-restart mean losses: restart r's copy gets exactly dL_r/dW
        loss = F.cross_entropy(logits, target, reduction="none").view(R, B).mean(dim=1).sum()
        # create_graph keeps the parameter gradients differentiable in x (the double backward).
        return list(torch.autograd.grad(loss, [copies[n] for n in self.names], create_graph=True))
