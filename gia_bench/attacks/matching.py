"""The gradient-matching engine behind DLG and Inverting Gradients.

Dummy inputs x (and, for ``labels=joint``, soft-label logits) are optimised so
that the observation they would produce matches the one seen, as the threat view
defines it (:mod:`gia_bench.attacks.views`)::

    minimise_x  D(view(grad_theta L(f_theta(x), y)), observed)  +  tv * prior(x)

with D an objective (:mod:`~gia_bench.attacks.objectives`) over the whole
observation, the prior from :mod:`~gia_bench.attacks.priors` and the optimiser
from :mod:`~gia_bench.attacks.optimizers`. DLG (``dlg``) and Inverting Gradients
(``ig``) are this engine with different :class:`MatchingConfig` defaults; every
field is a spec value, and named presets (``ig:preset=paper``) set several at once.

Robustness (an audit must not understate leakage because an optimiser tripped):

* every evaluation is a candidate: each restart keeps its best iterate by the
  objective it minimises (the matching loss when ``tv = 0``), not the last one;
* a non-finite step (L-BFGS without a line search can jump to inf within a few
  steps) does not end the run: the restart goes back to its best iterate, the step
  size is multiplied by ``backoff`` and the optimiser starts afresh;
* an L-BFGS run that stalls before its budget is spent (a long step into a flat,
  saturated region of a sigmoid network) backs off the same way, or, if it stalled
  at its best iterate, goes on from a new random start (best-of all attempts);
* of several restarts (and, in the ``aware`` view, of the naive phase's solutions)
  the one with the lowest matching loss in the attack's own view wins
  (Geiping et al.'s ``scoring_choice="loss"``).

Aware >= naive by construction: in the ``aware`` view the first ``naive_start``
fraction of the iterations matches the decoded gradient (the naive attack), the
rest matches the messages starting from the naive solution, and the naive
solution stays a candidate, judged by the aware objective. The budget is the same
as the naive attack's. A view that holds the naive objective whole and observes
more besides (:attr:`~gia_bench.attacks.views.ThreatView.extends_naive`: QSGD's
values through the identity plus its exact bucket norms) is optimised for the
whole budget with no naive phase: the phase would only restart the schedule
halfway (IG on 4 faces, ``qsgd:levels=16``: -0.35 dB with the phase, +0.04 without,
seed-to-seed noise 0.08).

Speed: R restarts are stacked in one tensor (R, B, C, H, W), scored together and
updated by one optimiser step when the optimiser is element-wise (Adam, SGD):
one backward pass serves them all. Their per-restart parameter gradients come from
one ``torch.func.vmap`` of ``torch.func.grad`` on CUDA (one batched kernel per
layer); on the CPU, where vmap gained nothing (0.98-1.07x, benchmarks/attacks.py),
from one batched pass with per-restart weight copies and im2col products
(:mod:`~gia_bench.attacks.unfold`) for the models and batch sizes where that was
measured faster, else (and for train-mode BatchNorm on CUDA, whose vmap'd double
backward is inexact) from one autograd pass per restart. L-BFGS couples
coordinates, so its restarts run one after another. The objective's target
statistics are computed once.

Candidates: :func:`candidate_function` maps candidate data to what the worker
would have fed its compressor: the gradient (FedSGD), or the update after K
simulated local steps for a FedAvg record (:class:`gia_bench.fedavg.CandidateUpdates`,
same call signature as :class:`CandidateGradients`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gia_bench.attacks import labels as label_parts
from gia_bench.attacks import unfold
from gia_bench.attacks.base import Attack, AttackError, Budget, Progress, Reconstruction
from gia_bench.attacks.objectives import OBJECTIVES, BoundSegments
from gia_bench.attacks.optimizers import OPTIMIZERS
from gia_bench.attacks.priors import PRIORS
from gia_bench.attacks.restarts import RestartGroup
from gia_bench.attacks.views import ThreatView, build_view, naive_view
from gia_bench.errors import SpecError
from gia_bench.fedavg import CandidateUpdates
from gia_bench.receiver import record_model
from gia_bench.records import GradientRecord

INITS = ("randn", "rand")
#: ways :class:`CandidateGradients` computes per-restart gradients (``auto`` picks one)
ROUTES = ("loop", "vmap", "unfold")
#: Inverting Gradients' learning-rate decay: / 10 at these fractions of the iterations
DECAY_AT = (3 / 8, 5 / 8, 7 / 8)


def _field(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class MatchingConfig:
    """Every setting of a gradient-matching attack; :class:`DLG` and :class:`InvertingGradients` differ in defaults."""

    iterations: int = _field(300, "optimiser steps per restart (L-BFGS: steps of up to max_iter evaluations each)")
    lr: float = _field(1.0, "learning rate (L-BFGS: step scale)")
    loss: str = _field("l2", "gradient distance over the whole observation (objectives registry: l2, cosine, l1,"
                       " masked-l2, masked-cosine)")  # fmt: skip
    optimizer: str = _field("lbfgs", "lbfgs, adam or sgd")
    labels: str = _field("auto", "auto (idlg for B = 1, mean-embedding-eb otherwise, see labels.resolve), idlg, bias-corrected, yin or"
                         " joint (optimised soft labels, as the original DLG)")  # fmt: skip
    prior: str = _field("tv", "image prior (tv, l2, none) weighted by tv")
    tv: float = _field(0.0, "weight of the image prior (0: none)")
    restarts: int = _field(1, "independent random starts; the lowest matching loss wins")
    signed: bool = _field(False, "step on the sign of the input gradient (Inverting Gradients)")
    boxed: bool = _field(False, "clamp pixels to the valid range after every step")
    decay: bool = _field(False, "divide the learning rate by 10 at 3/8, 5/8 and 7/8 of the iterations")
    init: str = _field("randn", "initial dummy: randn (N(0,1) in model-input space) or rand (uniform, valid range)")
    max_iter: int = _field(20, "L-BFGS evaluations per step (torch's default 20, as DLG's code)")
    history_size: int = _field(100, "L-BFGS history (torch's default 100)")
    line_search: bool = _field(False, "L-BFGS with a strong-Wolfe line search")
    backoff: float = _field(0.5, "on a non-finite step: back to the best iterate, step size times this, fresh optimiser")
    naive_start: float = _field(0.5, "aware view: fraction of the iterations spent on the naive objective first"
                                " (its solution stays a candidate); 0: aware objective only")  # fmt: skip
    preset: str | None = _field(None, "named settings (a preset's values apply unless given explicitly)")

    def check(self, name: str) -> None:
        """Raise :class:`SpecError` naming the attack and the bad value."""
        if self.iterations < 1 or self.restarts < 1 or self.max_iter < 1 or self.history_size < 1:
            raise SpecError(f"{name}: iterations, restarts, max_iter and history_size must be >= 1")
        if not self.lr > 0 or self.tv < 0:
            raise SpecError(f"{name}: lr must be > 0 and tv >= 0")
        if not 0 < self.backoff < 1:
            raise SpecError(f"{name}: backoff must be in (0, 1), got {self.backoff}")
        if not 0 <= self.naive_start < 1:
            raise SpecError(f"{name}: naive_start must be in [0, 1), got {self.naive_start}")
        if self.init not in INITS:
            raise SpecError(f"{name}: init {self.init!r} is not one of {', '.join(INITS)}")
        OBJECTIVES.get(self.loss)
        OPTIMIZERS.get(self.optimizer)
        PRIORS.get(self.prior)
        if self.labels != "auto":
            label_parts.LABELS.get(self.labels)


_FIELDS = tuple(f.name for f in dataclasses.fields(MatchingConfig))


def attack_model(record: GradientRecord, device: torch.device | str) -> nn.Module:
    """The recorded model, made stateless: forward passes never change its buffers.

    In train mode BatchNorm normalises with batch statistics and only *updates* its
    running statistics, which do not affect the gradient; dropping them
    (``replace_all_batch_norm_modules_``) keeps the maths and lets vmap batch restarts.
    In eval mode the running statistics are used and kept.
    """
    if record.meta.loss != "cross_entropy":
        raise AttackError(f"record {record.record_id}: loss {record.meta.loss!r} is not supported (cross_entropy only)")
    model = record_model(record, device)
    if record.meta.model.mode == "train":
        torch.func.replace_all_batch_norm_modules_(model)
    return model


class CandidateGradients:
    """Per-restart parameter gradients of the mean cross-entropy, differentiable in the inputs.

    ``__call__(x, y)`` with x (R, B, C, H, W) and y (R, B) class indices or (R, B, K)
    probabilities returns one (R, *param.shape) tensor per parameter, in record order.
    """

    def __init__(
        self, model: nn.Module, param_names: tuple[str, ...], route: str = "auto", batch_size: int | None = None
    ):
        if route == "auto":
            device = next(model.parameters()).device
            # vmap's double backward through train-mode BatchNorm is off by ~1e-4 (relative, in
            # float64, against finite differences); the per-restart passes are exact there.
            train_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
            if device.type == "cuda":
                route = "loop" if train_bn else "vmap"
            else:  # the batched im2col route only where it was measured faster than the loop
                route = "unfold" if unfold.faster_on_cpu(model, batch_size) else "loop"
        if route not in ROUTES:
            raise ValueError(f"route must be auto or one of {', '.join(ROUTES)}, got {route!r}")
        #: why the ``unfold`` route was not taken (None: it was, or was not asked for)
        self.fallback = unfold.unsupported(model) if route == "unfold" else None
        if self.fallback is not None:
            route = "loop"  # a module the batched route does not know: never a wrong gradient
        self.route = route
        self.model = model
        self.names = list(param_names)
        self._unfold = unfold.BatchedRestartGradients(model, self.names) if route == "unfold" else None
        named = dict(model.named_parameters())
        self.plist = [named[n] for n in self.names]
        self.params = {n: p.detach() for n, p in named.items()}
        self.buffers = {n: b for n, b in model.named_buffers()}

        def loss_of(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, (params, self.buffers), (x,)), y)

        self._batched = vmap(grad(loss_of), in_dims=(None, 0, 0))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[0] > 1 and self.route == "unfold":
            return self._unfold(x, y)
        if x.shape[0] > 1 and self.route == "vmap":
            out = self._batched(self.params, x, y)
            return [out[n] for n in self.names]
        # create_graph keeps the parameter gradients differentiable in x (the double backward).
        per_restart = [
            torch.autograd.grad(F.cross_entropy(self.model(x[r]), y[r]), self.plist, create_graph=True)
            for r in range(x.shape[0])
        ]
        if len(per_restart) == 1:
            return [g.unsqueeze(0) for g in per_restart[0]]
        return [torch.stack(gs) for gs in zip(*per_restart)]


#: ``(x, y) -> [(R, *param.shape)]``: what a candidate batch would have produced before compression
CandidateFunction = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]


def candidate_function(model: nn.Module, record: GradientRecord) -> CandidateFunction:
    """What the matching loop compares with the observation, ``(x, y) -> [(R, *shape)]`` per parameter.

    A FedSGD record: the candidate's gradient. A FedAvg record (``local_steps`` > 1): the
    update its K local SGD steps would send, simulated with the record's public lr and
    local batch (Inverting Gradients' multi-step setting, :mod:`gia_bench.fedavg`).
    """
    meta = record.meta
    if meta.is_fedsgd:
        return CandidateGradients(model, meta.param_names, batch_size=meta.batch_size)
    return CandidateUpdates(model, meta.param_names, meta.local_training(), meta.batch_size)


@dataclasses.dataclass
class _Problem:
    """One objective to minimise: the view's bound distance, the labels, the prior and the box."""

    view: ThreatView
    distance_to_target: BoundSegments
    candidates: CandidateFunction
    labels: torch.Tensor | None  # (B,) or None when optimised (joint)
    batch: int
    lo: torch.Tensor
    hi: torch.Tensor
    evaluations: int = 0

    def distance(self, x: torch.Tensor, y_logits: torch.Tensor | None) -> torch.Tensor:
        """Matching loss per restart, (R,): x (R, B, C, H, W), y_logits (R, B, K) or None."""
        if y_logits is None:
            assert self.labels is not None
            y = self.labels.expand(x.shape[0], self.batch)
        else:
            y = torch.softmax(y_logits, dim=-1)
        self.evaluations += x.shape[0]
        return self.distance_to_target(self.view.candidate_segments(self.candidates(x, y)))


@dataclasses.dataclass
class _Run:
    """The best iterate of each restart (by the objective) and what the run spent."""

    x: torch.Tensor  # (R, B, C, H, W)
    y: torch.Tensor | None  # (R, B, K) soft-label logits or None
    steps: int = 0
    backoffs: int = 0
    fresh_starts: int = 0


def _apply_defaults(cls: type[GradientMatching]) -> None:
    """Give ``cls`` a keyword-only ``__init__`` whose signature lists every :class:`MatchingConfig`
    field with ``cls.defaults``' value, and an ``Args:`` docstring section with each field's help:
    the registry (``gia-bench list attacks``, spec parsing) reads both."""
    hints = typing.get_type_hints(MatchingConfig)
    defaults = cls.defaults

    def __init__(self: GradientMatching, **settings: Any) -> None:
        GradientMatching._configure(self, settings)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=getattr(defaults, name), annotation=hints[name])
        for name in _FIELDS
    ]
    __init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    __init__.__annotations__ = {name: hints[name] for name in _FIELDS}
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = __init__  # type: ignore[method-assign]
    doc = inspect.cleandoc(cls.__doc__ or "")
    if "\nArgs:" not in doc:
        lines = [f"    {f.name}: {f.metadata['help']}" for f in dataclasses.fields(MatchingConfig)]
        if cls.presets:
            lines[-1] += f" ({', '.join(sorted(cls.presets))})"
        cls.__doc__ = doc + "\n\nArgs:\n" + "\n".join(lines) + "\n"


class GradientMatching(Attack):
    """Shared engine; see :class:`~gia_bench.attacks.dlg.DLG` and :class:`~gia_bench.attacks.inverting.InvertingGradients`.

    A subclass sets ``defaults`` (a :class:`MatchingConfig`), optionally ``presets``
    (name -> field values) and ``published`` (the budget of the published attack it
    reproduces), and gets a keyword ``__init__`` over every config field.
    """

    defaults: ClassVar[MatchingConfig] = MatchingConfig()
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    published: ClassVar[Budget | None] = None
    config: MatchingConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _apply_defaults(cls)

    def __init__(self, **settings: Any) -> None:
        self._configure(settings)

    @classmethod
    def from_config(cls, config: MatchingConfig) -> GradientMatching:
        """The attack with exactly these settings."""
        return cls(**dataclasses.asdict(config))

    def _configure(self, settings: dict[str, Any]) -> None:
        unknown = sorted(set(settings) - set(_FIELDS))
        if unknown:
            raise SpecError(f"{self.registry_name}: unknown parameter(s) {', '.join(unknown)}")
        base = self._preset_base(settings.get("preset", self.defaults.preset))
        config = dataclasses.replace(base, **settings)
        config.check(self.registry_name)
        self.config = config

    def _preset_base(self, preset: str | None) -> MatchingConfig:
        if preset is None:
            return self.defaults
        if preset not in self.presets:
            accepted = ", ".join(sorted(self.presets)) or "none"
            raise SpecError(f"{self.registry_name}: unknown preset {preset!r}; accepted: {accepted}")
        return dataclasses.replace(self.defaults, preset=preset, **self.presets[preset])

    def __getattr__(self, name: str) -> Any:
        # ``attack.iterations`` etc. read the config (spec strings and slugs use them)
        if name in _FIELDS and "config" in self.__dict__:
            return getattr(self.config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def spec_defaults(self) -> dict[str, Any]:
        # a preset's values are implied by its name: ``ig:preset=paper`` -> slug ``ig_preset-paper``
        return {**dataclasses.asdict(self._preset_base(self.config.preset)), "preset": self.defaults.preset}

    @property
    def budget(self) -> Budget:
        return Budget(self.config.iterations, self.config.restarts, None, self.config.preset)

    @property
    def published_budget(self) -> Budget | None:
        return self.published

    # -- the attack ---------------------------------------------------------------------------
    def run(
        self,
        record: GradientRecord,
        view: str,
        generator: torch.Generator,
        progress: Progress | None = None,
        device: torch.device | str = "cpu",
    ) -> Reconstruction:
        self.check_view(view)
        cfg = self.config
        device = torch.device(device)
        meta = record.meta
        batch, num_classes, shape = meta.batch_size, meta.dataset.num_classes, meta.dataset.shape
        threat = build_view(record, view, device)
        model = attack_model(record, device)

        # Labels come from the view's estimate of the gradient, never from the truth.
        strategy_name, inferred = label_parts.infer_labels(
            record, model, cfg.labels, generator, device, grads=list(threat.gradient)
        )
        if inferred is not None:
            inferred = inferred.to(device)
        candidates = candidate_function(model, record)
        objective = OBJECTIVES.create(cfg.loss)

        mean = torch.tensor(meta.dataset.mean, device=device).reshape(1, 1, -1, 1, 1)
        std = torch.tensor(meta.dataset.std, device=device).reshape(1, 1, -1, 1, 1)
        lo, hi = (0 - mean) / std, (1 - mean) / std

        def problem(v: ThreatView) -> _Problem:
            return _Problem(v, objective.bind_segments(v.segments), candidates, inferred, batch, lo, hi)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            """n random starts from the attack's generator: images (and soft-label logits for joint)."""
            if cfg.init == "randn":
                x = torch.randn((n, batch, *shape), generator=generator, device=device)
            else:
                x = lo + (hi - lo) * torch.rand((n, batch, *shape), generator=generator, device=device)
            y = torch.randn((n, batch, num_classes), generator=generator, device=device) if inferred is None else None
            return x, y

        R = cfg.restarts
        x0, y0 = draw(R)
        phases = self._phases(record, threat, problem, device)
        main = phases[-1][0]
        tracker = _ProgressTracker(progress, cfg.iterations * (R if not OPTIMIZERS.get(cfg.optimizer).elementwise else 1))
        pooled = self._search(phases, x0, y0, tracker, draw)
        # Every phase's solutions are candidates; the view's own matching loss decides.
        xs, ys = pooled.x, pooled.y
        with torch.enable_grad():
            scores = main.distance(xs, ys).detach()
        scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.inf))
        best = int(scores.argmin())
        labels = inferred.cpu() if ys is None else ys[best].argmax(dim=-1).cpu()
        evaluations = sum(p.evaluations for p, _ in phases) if len(phases) > 1 else main.evaluations
        return Reconstruction(
            inputs=xs[best].cpu().to(torch.float32),
            labels=labels.to(torch.int64),
            iterations=pooled.steps,
            final_loss=float(scores[best]),
            view=view,
            label_strategy=strategy_name,
            observed=threat.observed,
            public_state_used=threat.public_state_used,
            update=meta.local_training().describe(meta.batch_size),
            extra={
                "restart_losses": [float(s) for s in scores[-R:]],
                "best_restart": best % R,
                "candidates": [f"{p.view.name}:{r}" for p, _ in phases for r in range(R)],
                "best_candidate": best,
                "backoffs": pooled.backoffs,
                "fresh_starts": pooled.fresh_starts,
            },
            budget=Budget(cfg.iterations, R, evaluations, cfg.preset),
        )

    def _phases(
        self,
        record: GradientRecord,
        threat: ThreatView,
        problem: Callable[[ThreatView], _Problem],
        device: torch.device,
    ) -> list[tuple[_Problem, int]]:
        """(problem, iterations) in order; the last is the view's own. A view that neither is the
        naive one nor extends it matches the decoded gradient first (module docstring)."""
        cfg = self.config
        main = problem(threat)
        split = threat.name != "naive" and not (threat.same_as_naive or threat.extends_naive)
        if split and cfg.naive_start > 0 and cfg.iterations > 1:
            first = min(cfg.iterations - 1, max(1, round(cfg.iterations * cfg.naive_start)))
            return [(problem(naive_view(record, device)), first), (main, cfg.iterations - first)]
        return [(main, cfg.iterations)]

    def _search(
        self,
        phases: list[tuple[_Problem, int]],
        x0: torch.Tensor,
        y0: torch.Tensor | None,
        tracker: _ProgressTracker,
        draw: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]],
    ) -> _Run:
        """Each phase from the previous one's best iterates; all phases' best iterates pooled
        (phase by phase, restarts in order) with the steps, backoffs and fresh starts they took."""
        runs: list[_Run] = []
        x, y = x0, y0
        for prob, its in phases:
            runs.append(self._optimise(prob, x, y, its, tracker, draw))
            x, y = runs[-1].x, runs[-1].y
        ys = None if y0 is None else torch.cat([r.y for r in runs if r.y is not None])
        return _Run(
            torch.cat([r.x for r in runs]), ys, sum(r.steps for r in runs),
            sum(r.backoffs for r in runs), sum(r.fresh_starts for r in runs),
        )

    def _optimise(
        self,
        prob: _Problem,
        x0: torch.Tensor,
        y0: torch.Tensor | None,
        iterations: int,
        tracker: _ProgressTracker,
        fresh: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    ) -> _Run:
        """Minimise ``prob`` from (x0, y0) for ``iterations`` steps; the best iterate of each restart.

        ``fresh(n)`` draws n new random starts: an L-BFGS run that stalls (its step leaves x
        unchanged) before the budget is spent goes on from one, if it stalled at its best
        iterate, or from that best iterate with a smaller step, if it stalled somewhere worse;
        either way the best iterate of every attempt stays the candidate.
        """
        part = OPTIMIZERS.create(self.config.optimizer)
        prior = PRIORS.create(self.config.prior)
        R = x0.shape[0]
        groups = [list(range(R))] if part.elementwise else [[r] for r in range(R)]
        milestones = [int(iterations * f) for f in DECAY_AT] if self.config.decay else []
        run = _Run(x0.detach().clone(), None if y0 is None else y0.detach().clone())
        for group in groups:
            search = RestartGroup(self.config, part, prior, prob, x0[group], None if y0 is None else y0[group])
            run.steps = max(run.steps, search.run(iterations, milestones, tracker, fresh))
            run.backoffs, run.fresh_starts = run.backoffs + search.backoffs, run.fresh_starts + search.fresh_starts
            run.x[group] = search.best.x
            if run.y is not None:
                run.y[group] = search.best.y
        return run

class _ProgressTracker:
    """Calls ``progress(done, total, loss)`` about 200 times per run (one device sync each)."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0
        self.every = max(1, total // 200)

    def advance(self, steps: int, loss: torch.Tensor | float) -> None:
        before, self.done = self.done, self.done + steps
        if self.progress is not None and (self.done // self.every > before // self.every or self.done >= self.total):
            value = float(loss.min()) if isinstance(loss, torch.Tensor) else float(loss)
            self.progress(min(self.done, self.total), self.total, value)
