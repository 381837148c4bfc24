"""gia-bench on Flower: a client mod, a server strategy wrapper, and ``gia-bench federated``.

Federated averaging (McMahan et al. 2017, Algorithm 1): each round the server sends the
global weights w_0 to the sampled clients; a client takes K local SGD steps on its private
examples and answers with w_K; the server averages. gia-bench puts its defenses on the
client's *update* and keeps what a curious server sees as records:

1. :class:`DefenseMod` (a Flower client mod) wraps the client's ``train`` handler. It
   expresses the client's answer as the FedAvg update ``u = (w_0 - w_K) / local_lr``
   (the shared record format, :mod:`gia_bench.fedavg`), sends ``u`` through any gia-bench
   defense (``Compressor.step`` on a :class:`~gia_bench.comm.LocalCommunicator`) and
   replaces the full weights in the reply by the defense's messages. Bytes are the
   messages' bytes, counted by the communicator, never by a formula. The compressor's
   state (error feedback, warm-start Q) lives in the client's ``Context.state``, so it
   carries over between the rounds the client takes part in.
2. :class:`CaptureStrategy` wraps any Flower server strategy (FedAvg by default). It decodes
   every client's messages with the defense's receiver side, hands the inner strategy
   ordinary weights ``w_0 - local_lr * decode(messages)`` to aggregate, and for the rounds
   it captures saves each sampled client's messages as a FedAvg
   :class:`~gia_bench.records.GradientRecord`: exactly what ``capture --local-steps``
   writes, so ``gia-bench attack`` and ``gia-bench report`` read them unchanged.
3. :func:`run_federated` (``gia-bench federated``): a Flower simulation (Flower's own
   simulation engine, on Ray) of clients holding IID shards of a data set, with the two
   pieces above; writes ``metrics.json`` and, for the captured rounds, records plus the
   truth files of the clients' private examples.

Non-parameter state (BatchNorm running statistics) is not a gradient: the mod sends it
beside the messages in fp32, counted apart as ``buffer_bytes``, so that the global model's
statistics follow training as in plain FedAvg.

Flower is optional (``pip install 'gia-bench[flower]'``); without it this module still
imports and every entry point raises :class:`FlowerMissingError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.data import DatasetSpec, ImageDataset, load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.defenses.base import Compressor
from gia_bench.errors import CompressorError, GiaBenchError, SpecError
from gia_bench.events import SILENT, Events
from gia_bench.fedavg import LocalTraining, step_indices
from gia_bench.flower_engine import flower_simulation  # the default Engine (Ctrl-C stops it)
from gia_bench.io import atomic_write_json
from gia_bench.models import MODELS, ModelSpec, build_model
from gia_bench.records import RECORD_SUFFIX, GradientRecord, RecordMeta, Truth, truth_path
from gia_bench.receiver import check_record

try:  # Flower is an optional extra: the module imports without it, its entry points say what to install
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg, Strategy

    HAVE_FLOWER = True
except ImportError:  # pragma: no cover - exercised by the missing-extra test through a subprocess
    HAVE_FLOWER = False
    Strategy = object  # type: ignore[assignment,misc]

FLOWER_INSTALL = "pip install 'gia-bench[flower]'"

#: Keys of what the mod puts in a client's reply (the Flower ``RecordDict``).
MESSAGES_KEY = "gia-bench.messages"  # ArrayRecord: the defense's messages, tag -> tensor, in send order
PUBLIC_KEY = "gia-bench.public"  # ArrayRecord: the compressor's public state before the step
BUFFERS_KEY = "gia-bench.buffers"  # ArrayRecord: non-parameter state (BatchNorm statistics), fp32
INFO_KEY = "gia-bench"  # ConfigRecord: defense spec, local training, client id, message descriptions
#: A client's train handler may put its exact update u here (an ArrayRecord, parameter name -> tensor);
#: otherwise the mod computes u = (w_0 - w_K) / local_lr from the weights (equal up to rounding).
UPDATE_KEY = "gia-bench.update"
#: ArrayRecord: the compressor's *private* state before the step (its error-feedback residual),
#: put in the reply only by ``DefenseMod(send_private=True)``: a simulation's channel to the truth
#: file (the ``oracle`` view's input), never to a record or to the inner strategy.
PRIVATE_KEY = "gia-bench.private"
#: Where the mod keeps the compressor's state in the client's ``Context.state`` (never sent).
STATE_KEY = "gia-bench.defense-state"
#: Train-config keys the mod reads when it is not given the local training explicitly.
CONFIG_LR, CONFIG_STEPS, CONFIG_BATCH = "local-lr", "local-steps", "local-batch"


class FlowerMissingError(GiaBenchError):
    """Flower (the ``flower`` extra) is not installed."""


def require_flower() -> None:
    """Raise :class:`FlowerMissingError` (one line, exit 2 on the CLI) unless Flower imports."""
    if not HAVE_FLOWER:
        raise FlowerMissingError(f"Flower is not installed: {FLOWER_INSTALL}")


# -- Flower records <-> tensors --------------------------------------------------------------------


def to_array_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of CPU copies of ``tensors`` (order kept)."""
    if not tensors:
        return ArrayRecord()
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord, in its order (writable copies)."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def _save_state(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _load_state(data: bytes) -> dict[str, Any]:
    # weights_only: tensors, dicts, lists and plain values only; nothing is unpickled beyond that
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# -- the client mod --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DefenseMod:
    """A Flower client mod that sends the client's FedAvg update through a gia-bench defense.

    Add it to a ``ClientApp`` (``ClientApp(mods=[DefenseMod("lqsgd:rank=2", ...)])``) and
    wrap the server's strategy in :class:`CaptureStrategy` with the same defense. On a
    ``train`` message the mod

    1. reads the global weights w_0 the server sent (``arrays_key``) and lets the client train;
    2. takes the client's update u: the reply's ``gia-bench.update`` record if the client
       put its exact update there, else ``(w_0 - w_K) / local_lr`` of the reply's weights;
    3. calls ``Compressor.step(u, LocalCommunicator)`` with the compressor state this
       client kept from its previous rounds (``Context.state``), and saves the new state;
    4. replies with the defense's messages, the compressor's public state, the
       non-parameter arrays (BatchNorm statistics) and a small description, instead of
       the weights; ``metrics`` gains ``gia-bench-bytes`` (the messages' bytes).

    ``local_lr``, ``local_steps`` and ``local_batch`` are public FedAvg metadata (the
    record format of :mod:`gia_bench.fedavg`); left None, they are read from the train
    config (``local-lr``, ``local-steps``, ``local-batch``). ``param_names`` are the
    model's parameters in ``named_parameters()`` order; None takes every floating-point
    array of the weights (right for models without buffers). The number of private
    examples is the reply's ``num-examples`` metric (Flower's FedAvg needs it anyway).

    ``send_private`` (simulations only) also puts the compressor's private state before the
    step (``Compressor.private_state``: the error-feedback residual e the client adds, in
    parameter order) in the reply under ``gia-bench.private``. :class:`CaptureStrategy`
    writes it to the truth file, as ``capture`` and the trainer do, so the ``oracle`` view
    can read it; it is never saved in a record. Leave it False in a real deployment: the
    residual is the client's secret and the server would receive it.
    """

    defense: str
    local_lr: float | None = None
    local_steps: int | None = None
    local_batch: int | None = None
    param_names: tuple[str, ...] | None = None
    arrays_key: str = "arrays"
    metrics_key: str = "metrics"
    send_private: bool = False

    def __post_init__(self) -> None:
        require_flower()
        create_defense(self.defense)  # a bad spec fails when the app is built, not in round 1
        if self.param_names is not None:
            object.__setattr__(self, "param_names", tuple(self.param_names))

    def __call__(self, msg: Message, ctx: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(msg, ctx)
        if self.arrays_key not in msg.content.array_records:
            raise CompressorError(f"DefenseMod: the train message has no ArrayRecord {self.arrays_key!r} (arrays_key)")
        w0 = from_array_record(msg.content.array_records[self.arrays_key])
        config = msg.content.config_records.get("config", ConfigRecord())
        reply = call_next(msg, ctx)
        if reply.has_error():
            return reply
        content = reply.content
        if self.arrays_key not in content.array_records:
            raise CompressorError(f"DefenseMod: the client's reply has no ArrayRecord {self.arrays_key!r} (arrays_key)")
        w_k = from_array_record(content.array_records[self.arrays_key])
        local = self._local_training(config)
        names = self._names(w_k)
        if UPDATE_KEY in content.array_records:
            given = from_array_record(content.array_records[UPDATE_KEY])
            missing = [n for n in names if n not in given]
            if missing:
                raise CompressorError(f"DefenseMod: the reply's {UPDATE_KEY!r} lacks parameters {missing[:3]}")
            update = [given[n].to(torch.float32) for n in names]
        else:
            update = [(w0[n].to(torch.float32) - w_k[n].to(torch.float32)) / local.lr for n in names]
        metrics = content.metric_records.get(self.metrics_key)
        if metrics is None or "num-examples" not in metrics:
            raise CompressorError(f"DefenseMod: the reply's {self.metrics_key!r} MetricRecord lacks 'num-examples'")
        examples = int(metrics["num-examples"])
        local.check(examples, "DefenseMod")
        compressor = self._compressor(ctx)
        comm = LocalCommunicator(record=True)
        # what this client adds privately to its update (error feedback): for the truth file only
        private = compressor.private_state(list(names), [u.shape for u in update]) if self.send_private else {}
        compressor.step(update, comm, keys=list(names))
        # kept for this client's next round only after a successful step
        ctx.state[STATE_KEY] = ConfigRecord({"spec": compressor.spec, "state": _save_state(compressor.state_dict())})
        buffers = {k: v for k, v in w_k.items() if k not in set(names)}
        info = {
            "defense": compressor.spec,
            "param-names": json.dumps(list(names)),
            "messages": json.dumps([m.info() for m in comm.messages]),
            "bytes": int(comm.bytes_sent),
            "client": int(ctx.node_config.get("partition-id", ctx.node_id)),
            "examples": examples,
            "local-steps": local.steps,
            "local-lr": float(local.lr),
            "local-batch": local.local_batch(examples),
        }
        out = RecordDict()
        for key, record in content.items():
            if key not in (self.arrays_key, UPDATE_KEY):
                out[key] = record
        out[MESSAGES_KEY] = to_array_record(messages_by_tag(comm.messages))
        out[PUBLIC_KEY] = to_array_record(compressor.public_state())
        out[BUFFERS_KEY] = to_array_record(buffers)
        out[INFO_KEY] = ConfigRecord(info)
        if self.send_private:
            out[PRIVATE_KEY] = to_array_record(private)
        metrics["gia-bench-bytes"] = int(comm.bytes_sent)
        reply.content = out
        return reply

    def _local_training(self, config: ConfigRecord) -> LocalTraining:
        def pick(given: Any, key: str, cast: Callable[[Any], Any]) -> Any:
            if given is not None:
                return given
            if key not in config:
                raise CompressorError(f"DefenseMod: {key!r} is neither given to the mod nor in the train config")
            return cast(config[key])

        return LocalTraining(
            steps=pick(self.local_steps, CONFIG_STEPS, int),
            lr=pick(self.local_lr, CONFIG_LR, float),
            batch=pick(self.local_batch, CONFIG_BATCH, int),
        )

    def _names(self, weights: dict[str, torch.Tensor]) -> tuple[str, ...]:
        if self.param_names is None:
            return tuple(k for k, v in weights.items() if v.is_floating_point())
        missing = [n for n in self.param_names if n not in weights]
        if missing:
            raise CompressorError(f"DefenseMod: the client's weights lack parameters {missing[:3]} (param_names)")
        return self.param_names

    def _compressor(self, ctx: Context) -> Compressor:
        compressor = create_defense(self.defense)
        saved = ctx.state.config_records.get(STATE_KEY)
        if saved is not None and saved["spec"] == compressor.spec:
            compressor.load_state_dict(_load_state(saved["state"]))
        return compressor


# -- the server strategy wrapper -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
    """What the server received from one client in one round (one line of ``metrics.json``)."""

    round: int
    client: int
    examples: int
    bytes: int  # the defense's messages, as the communicator counted them
    buffer_bytes: int  # non-parameter arrays sent beside them (fp32)
    record: Path | None  # the saved record, for captured rounds

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["record"] = None if self.record is None else str(self.record)
        return data


TruthFn = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor] | None"]


class CaptureStrategy(Strategy):
    """Wrap a Flower strategy: decode :class:`DefenseMod` replies, aggregate, save client updates as records.

    ``defense`` must be the spec the clients' mod uses: the server builds its own
    compressor from it (a reply naming another defense is refused, so a client cannot
    make the server import anything). ``model`` and ``dataset`` are what records
    describe (:class:`~gia_bench.models.ModelSpec`, :class:`~gia_bench.data.DatasetSpec`).
    Rounds in ``capture_rounds`` (1-based; None: every round) are saved under ``out`` as
    ``<prefix>r<round>-c<client>.safetensors``; ``truth_fn(round, client)``, where the
    caller knows the clients' examples (a simulation), adds the truth file beside each.
    Record ``step`` is the number of global updates the model has had (round - 1).
    """

    def __init__(
        self,
        strategy: Strategy,
        defense: str,
        model: ModelSpec,
        dataset: DatasetSpec,
        out: Path | str | None = None,
        capture_rounds: Collection[int] | None = None,
        seed: int = 0,
        truth_fn: TruthFn | None = None,
        record_prefix: str = "",
        arrays_key: str = "arrays",
    ) -> None:
        require_flower()
        self.strategy = strategy
        self.compressor = create_defense(defense)
        self.model_spec = model
        self.dataset_spec = dataset
        self.out = None if out is None else Path(out)
        self.capture_rounds = None if capture_rounds is None else frozenset(int(r) for r in capture_rounds)
        self.seed = seed
        self.truth_fn = truth_fn
        self.record_prefix = record_prefix
        self.arrays_key = arrays_key
        with torch.device("meta"):
            probe = build_model(model, seed=None, device=None)
        self.param_names = tuple(n for n, _ in probe.named_parameters())
        self.param_shapes = [p.shape for _, p in probe.named_parameters()]
        self.updates: list[ClientUpdate] = []
        self._global: dict[int, dict[str, torch.Tensor]] = {}

    # -- Strategy: delegate, remembering what the server sent --------------------------------------
    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        # only the current round's weights are needed to decode its replies
        self._global = {server_round: from_array_record(arrays)}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        w0 = self._global.get(server_round)
        if w0 is None:
            raise CompressorError(f"CaptureStrategy: round {server_round} replies without its configure_train")
        kept = []
        for reply in replies:
            if reply.has_error():
                kept.append(reply)  # the inner strategy counts and logs failures
                continue
            self._receive(server_round, reply, w0)
            kept.append(reply)
        return self.strategy.aggregate_train(server_round, kept)

    def capturing(self, server_round: int) -> bool:
        return self.out is not None and (self.capture_rounds is None or server_round in self.capture_rounds)

    # -- the receiver's side of one client --------------------------------------------------------
    def _receive(self, server_round: int, reply: Message, w0: dict[str, torch.Tensor]) -> None:
        content = reply.content
        if INFO_KEY not in content.config_records or MESSAGES_KEY not in content.array_records:
            raise CompressorError(
                "CaptureStrategy: a client's reply holds no gia-bench messages: add DefenseMod to its ClientApp"
            )
        info = content.config_records[INFO_KEY]
        spec = str(info["defense"])
        if spec != self.compressor.spec:
            raise CompressorError(f"CaptureStrategy: a client sent defense {spec!r}, the server expects {self.compressor.spec!r}")
        names = tuple(json.loads(str(info["param-names"])))
        if names != self.param_names:
            raise CompressorError(f"CaptureStrategy: the client's parameters differ from model {self.model_spec.spec!r}'s")
        messages = from_array_record(content.array_records[MESSAGES_KEY])
        public = from_array_record(content.array_records.get(PUBLIC_KEY, ArrayRecord()))
        buffers = from_array_record(content.array_records.get(BUFFERS_KEY, ArrayRecord()))
        private = from_array_record(content.array_records.get(PRIVATE_KEY, ArrayRecord()))
        infos = tuple(dict(m) for m in json.loads(str(info["messages"])))
        sent = sum(int(m["nbytes"]) for m in infos)
        payload = sum(t.numel() * t.element_size() for t in messages.values())
        if sent != int(info["bytes"]) or sent != payload:
            raise CompressorError(
                f"CaptureStrategy: the client counted {int(info['bytes'])} bytes, its messages describe {sent}"
                f" and hold {payload}"
            )
        decoded = self.compressor.decode(messages, self.param_shapes, public)
        lr = float(info["local-lr"])
        weights = {k: v.clone() for k, v in w0.items()}
        for name, u in zip(self.param_names, decoded):
            weights[name] = (w0[name].to(torch.float32) - lr * u.to(torch.float32)).to(w0[name].dtype)
        unknown = [k for k in buffers if k not in weights or k in self.param_names]
        if unknown:
            raise CompressorError(f"CaptureStrategy: the client sent unknown arrays {unknown[:3]}")
        weights.update(buffers)
        client, examples = int(info["client"]), int(info["examples"])
        record_path = None
        if self.capturing(server_round):
            local = LocalTraining(int(info["local-steps"]), lr, int(info["local-batch"]))
            record_path = self._save_record(
                server_round, client, examples, local, messages, infos, sent, public, w0, private
            )
        buffer_bytes = sum(t.numel() * t.element_size() for t in buffers.values())
        self.updates.append(ClientUpdate(server_round, client, examples, sent, buffer_bytes, record_path))
        new = RecordDict()
        for key, record in content.items():
            if key not in (MESSAGES_KEY, PUBLIC_KEY, BUFFERS_KEY, INFO_KEY, PRIVATE_KEY):
                new[key] = record
        new[self.arrays_key] = to_array_record(weights)
        reply.content = new

    def _save_record(
        self,
        server_round: int,
        client: int,
        examples: int,
        local: LocalTraining,
        messages: dict[str, torch.Tensor],
        infos: tuple[dict[str, Any], ...],
        sent: int,
        public: dict[str, torch.Tensor],
        w0: dict[str, torch.Tensor],
        private: dict[str, torch.Tensor],
    ) -> Path:
        """Write the truth file (with the client's private residual, when it sent one) and then the record."""
        assert self.out is not None
        rid = f"{self.record_prefix}r{server_round:03d}-c{client:03d}"
        meta = RecordMeta(
            record_id=rid,
            defense=self.compressor.spec,
            model=self.model_spec,
            dataset=self.dataset_spec,
            batch_size=examples,
            param_names=self.param_names,
            messages=infos,
            bytes_sent=sent,
            step=server_round - 1,
            seed=self.seed,
            extra={"source": "federated", "round": server_round, "client": client},
            **local.meta_fields(examples),
        )
        record = GradientRecord(meta, messages, {k: v.clone() for k, v in w0.items()}, public)
        check_record(record)
        path = self.out / f"{rid}{RECORD_SUFFIX}"
        self.out.mkdir(parents=True, exist_ok=True)
        truth = None if self.truth_fn is None else self.truth_fn(server_round, client)
        if truth is not None:  # the truth first, so an interrupted run leaves no record without its truth
            n_params = sum(int(math.prod(s)) for s in self.param_shapes)
            residual = private.get("residual")
            if residual is not None and (residual.numel() != n_params or not residual.is_floating_point()):
                raise CompressorError(
                    f"CaptureStrategy: client {client} sent a private residual of {residual.numel()} {residual.dtype}"
                    f" values, model {self.model_spec.spec!r} has {n_params} parameters"
                )
            # the client's private residual goes to the truth file only (the oracle view's input), never the record
            Truth(truth[0].detach().cpu(), truth[1].detach().cpu().to(torch.int64), rid, private).save(truth_path(path))
        record.save(path)
        return path


# -- gia-bench federated: the simulation ---------------------------------------------------------


#: Bounds of ``gia-bench federated`` (checked by :meth:`FederatedConfig.check` before Ray starts):
#: every client is a simulated SuperNode on this machine, and Ray cannot place a client that
#: reserves more CPUs than it has (it waits forever) or less than a hundredth of one.
MAX_CLIENTS = 1000
MAX_ROUNDS = 10_000
MIN_CPUS_PER_CLIENT = 0.01


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
    """What ``gia-bench federated`` runs.

    Attributes:
        dataset: data set spec; clients hold IID shards of its train split, the server tests on its test split.
        model: model spec.
        defense: compressor spec applied to every client's update.
        clients: number of clients (Flower SuperNodes); all take part in every round.
        rounds: FedAvg rounds.
        local_steps: K local SGD steps per round.
        local_lr: the clients' SGD learning rate.
        local_batch: examples per local step (None: all of the round's examples).
        batch_size: private examples per client per round, drawn from its shard (the record's batch).
        capture_rounds: rounds (1-based) whose client updates are saved as records.
        out: run folder (``metrics.json``, ``records/``).
        seed: model initialisation, the shards, the clients' examples.
        data_root, download: torchvision data sets (as ``capture``).
        cpus_per_client: Ray CPUs each simulated client reserves.
        num_cpus: CPUs Ray may use (None: Ray's default, all of them).
        plugins: ``module:Class`` names the user trusts (``--plugin``): a defense or model spec may
            name them; the simulation's client processes inherit the trust.
    """

    dataset: str = "digits"
    model: str = "convnet:width=16"
    defense: str = "none"
    clients: int = 4
    rounds: int = 5
    local_steps: int = 5
    local_lr: float = 0.1
    local_batch: int | None = 16
    batch_size: int = 64
    capture_rounds: tuple[int, ...] = ()
    out: Path = Path("federated")
    seed: int = 0
    data_root: Path | None = None
    download: bool = False
    cpus_per_client: float = 1.0
    num_cpus: int | None = None
    plugins: tuple[str, ...] = ()

    @property
    def local(self) -> LocalTraining:
        return LocalTraining(self.local_steps, self.local_lr, self.local_batch)

    def check(self) -> None:
        """Every value in range before anything starts (one :class:`SpecError` naming the flag):
        a value Ray cannot place (``--num-cpus 0``, ``--cpus-per-client 1e9``) would hang, not fail."""
        from gia_bench.budget import check_local_work
        from gia_bench.records import MAX_BATCH

        cpus = os.cpu_count() or 1
        for flag, value, low, high in (
            ("--clients", self.clients, 1, MAX_CLIENTS),
            ("--rounds", self.rounds, 1, MAX_ROUNDS),
            ("--batch-size", self.batch_size, 1, MAX_BATCH),
            ("--seed", self.seed, 0, 2**63 - 1),  # numpy's SeedSequence takes no negative seed
            ("--num-cpus", cpus if self.num_cpus is None else self.num_cpus, 1, cpus),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise SpecError(f"{flag} must be an integer in [{low}, {high}], got {value!r}")
        self.local.check(self.batch_size)
        if self.capture_rounds:  # the records must be attackable: their simulated work is bounded
            check_local_work(self.local_steps, self.local.local_batch(self.batch_size), "--local-steps x --local-batch")
        bad = [r for r in self.capture_rounds if not 1 <= r <= self.rounds]
        if bad:
            raise SpecError(f"--capture-rounds {','.join(map(str, bad))}: rounds run from 1 to --rounds {self.rounds}")
        most = cpus if self.num_cpus is None else self.num_cpus
        value = self.cpus_per_client
        if isinstance(value, bool) or not isinstance(value, int | float) or not MIN_CPUS_PER_CLIENT <= value <= most:
            raise SpecError(
                f"--cpus-per-client must be in [{MIN_CPUS_PER_CLIENT}, {most}] (--num-cpus, else this machine's CPUs),"
                f" got {value!r}"
            )
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise SpecError(f"--out {self.out}: is a file, expected a folder")
        if (Path(self.out) / METRICS_FILE).exists() or any((Path(self.out) / RECORDS_DIR).glob(f"*{RECORD_SUFFIX}")):
            raise SpecError(f"--out {self.out}: already holds a federated run; use another --out or delete it")


METRICS_FILE = "metrics.json"
RECORDS_DIR = "records"


def parse_rounds(text: str) -> tuple[int, ...]:
    """``"1,5"`` -> (1, 5); ``""`` -> (); every item a positive integer."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise SpecError(f"--capture-rounds {text!r}: expected round numbers like 1,5")
        out.append(int(item))
    return tuple(sorted(set(out)))


def shard_indices(n: int, clients: int, seed: int) -> list[list[int]]:
    """IID shards: a permutation of ``range(n)`` seeded with ``seed``, cut into ``clients`` near-equal parts."""
    if clients > n:
        raise SpecError(f"--clients {clients}: more clients than the {n} training examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [part.tolist() for part in torch.tensor_split(perm, clients)]


def round_examples(shard: Sequence[int], batch_size: int, seed: int, server_round: int, client: int) -> list[int]:
    """The client's private examples of a round: ``batch_size`` distinct ones of its shard.

    A deterministic function of (seed, round, client) (numpy's ``SeedSequence`` mixes
    them), so the simulation can write the truth of a record without keeping data.
    """
    if batch_size > len(shard):
        raise SpecError(f"--batch-size {batch_size} is larger than client {client}'s shard of {len(shard)} examples")
    entropy = int(np.random.SeedSequence([seed, server_round, client]).generate_state(1, np.uint64)[0] >> 1)
    pick = torch.randperm(len(shard), generator=torch.Generator().manual_seed(entropy))[:batch_size]
    return [int(shard[i]) for i in pick]


def train_locally(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, local: LocalTraining
) -> tuple[list[torch.Tensor], float]:
    """K local SGD steps in place (BatchNorm statistics update as in real training); returns (u, mean loss).

    Step k uses the examples :func:`gia_bench.fedavg.step_indices` names, and u is the sum
    of the K gradients: the update :func:`gia_bench.fedavg.local_update` defines (the
    record format), computed on the live module so that its buffers train too.
    """
    n = int(images.shape[0])
    b = local.local_batch(n)
    params = [p for _, p in model.named_parameters()]
    total = [torch.zeros_like(p) for p in params]
    losses = []
    for k in range(local.steps):
        index = torch.tensor(step_indices(k, b, n))
        loss = F.cross_entropy(model(images.index_select(0, index)), labels.index_select(0, index))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, t in zip(params, grads, total):
                t.add_(g)
                p.sub_(local.lr * g)
        losses.append(float(loss.detach()))
    return total, sum(losses) / len(losses)


@dataclasses.dataclass
class _Setup:
    """What clients and server derive from the config (built once per process)."""

    cfg: FederatedConfig
    train: ImageDataset
    model_spec: ModelSpec
    shards: list[list[int]]

    def examples(self, server_round: int, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = round_examples(self.shards[client], self.cfg.batch_size, self.cfg.seed, server_round, client)
        return self.train.batch(idx)


_SETUPS: dict[FederatedConfig, _Setup] = {}


def _setup(cfg: FederatedConfig) -> _Setup:
    if cfg not in _SETUPS:  # Ray actors are reused across rounds: load the data once per process
        train = load_dataset(cfg.dataset, root=cfg.data_root, download=cfg.download, split="train")
        spec = train.spec
        probe = ModelSpec(cfg.model, spec.shape, spec.num_classes, "train")
        from gia_bench.capture import model_spec_string

        model = build_model(probe, seed=cfg.seed, device="cpu")
        model_spec = dataclasses.replace(probe, spec=model_spec_string(model, cfg.model))
        _SETUPS[cfg] = _Setup(cfg, train, model_spec, shard_indices(len(train), cfg.clients, cfg.seed))
    return _SETUPS[cfg]


def make_client_app(cfg: FederatedConfig):
    """The simulation's ``ClientApp``: local training on the client's examples, then :class:`DefenseMod`."""
    require_flower()
    from flwr.clientapp import ClientApp

    setup = _setup(cfg)
    names = tuple(n for n, _ in build_model(setup.model_spec, seed=None).named_parameters())
    # a simulation: the mod also hands over the client's private residual, for the truth files (oracle view)
    mod = DefenseMod(cfg.defense, cfg.local_lr, cfg.local_steps, cfg.local_batch, names, send_private=True)
    app = ClientApp(mods=[mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        torch.set_num_threads(max(1, int(cfg.cpus_per_client)))
        s = _setup(cfg)
        client = int(ctx.node_config["partition-id"])
        server_round = int(msg.content.config_records["config"]["server-round"])
        model = build_model(s.model_spec, seed=None)
        model.load_state_dict(from_array_record(msg.content.array_records["arrays"]), strict=True)
        images, labels = s.examples(server_round, client)
        update, loss = train_locally(model, images, labels, cfg.local)
        names = [n for n, _ in model.named_parameters()]
        content = RecordDict(
            {
                "arrays": to_array_record(model.state_dict()),
                UPDATE_KEY: to_array_record(dict(zip(names, update))),
                "metrics": MetricRecord({"num-examples": int(images.shape[0]), "train-loss": loss}),
            }
        )
        return Message(content, reply_to=msg)

    return app


def evaluate(model: nn.Module, data: ImageDataset, batch: int = 512) -> tuple[float, int]:
    """Test accuracy of ``model`` (eval mode) on ``data``: (accuracy, examples)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch):
            x, y = data.batch(range(start, min(start + batch, len(data))))
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(data), len(data)


@dataclasses.dataclass(frozen=True)
class FederatedResult:
    """The run's ``metrics.json`` as written, and where."""

    metrics: dict[str, Any]
    path: Path

    @property
    def records(self) -> list[Path]:
        return [Path(c["record"]) for r in self.metrics["rounds"] for c in r["clients"] if c["record"]]


def round_line(row: dict[str, Any], rounds: int) -> str:
    """``round 2/5: test accuracy 81.25%, 1,234 bytes per client, 4 records``."""
    records = sum(1 for c in row["clients"] if c["record"])
    return (f"round {row['round']}/{rounds}: test accuracy {100 * row['test_accuracy']:.2f}%,"
            f" {row['bytes_per_client']:,.0f} bytes per client" + (f", {records} records" if records else ""))


def make_server(cfg: FederatedConfig, events: Events = SILENT):
    """The simulation's ``ServerApp`` (FedAvg in :class:`CaptureStrategy`, central test accuracy) and its log.

    Returns ``(server_app, log)``; after the run, ``log`` holds ``rounds`` (one dict per
    round, as ``metrics.json`` writes them) and ``initial`` (round-0 accuracy). Each
    evaluated round is an ``events.on_result("round R", round_line(...))`` and an
    ``on_step(R, ..., {"test_accuracy", "bytes_per_client"})``.
    """
    require_flower()
    from flwr.serverapp import Grid, ServerApp

    setup = _setup(cfg)
    test = load_dataset(cfg.dataset, root=cfg.data_root, download=cfg.download, split="test")
    out = Path(cfg.out)
    strategy = CaptureStrategy(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=cfg.clients, min_available_nodes=cfg.clients),
        cfg.defense,
        setup.model_spec,
        setup.train.spec,
        out=out / RECORDS_DIR,
        capture_rounds=cfg.capture_rounds,
        seed=cfg.seed,
        truth_fn=setup.examples,
        record_prefix=_record_prefix(cfg),
    )
    log: dict[str, Any] = {"rounds": [], "initial": None, "strategy": strategy}

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = build_model(setup.model_spec, seed=None)
        model.load_state_dict(from_array_record(arrays), strict=True)
        accuracy, n = evaluate(model, test)
        if server_round == 0:
            log["initial"] = {"test_accuracy": accuracy, "test_examples": n}
        else:
            updates = sorted((u for u in strategy.updates if u.round == server_round), key=lambda u: u.client)
            row = {
                "round": server_round,
                "test_accuracy": accuracy,
                "test_examples": n,
                "clients_sampled": len(updates),
                "bytes_per_client": _mean(u.bytes for u in updates),
                "clients": [u.to_json() for u in updates],
            }
            log["rounds"].append(row)
            events.on_result(f"round {server_round}", round_line(row, cfg.rounds))
            events.on_step(server_round, f"round {server_round}/{cfg.rounds}",
                           {"test_accuracy": accuracy, "bytes_per_client": row["bytes_per_client"]})
        return MetricRecord({"accuracy": accuracy})

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = build_model(setup.model_spec, seed=cfg.seed)
        strategy.start(
            grid,
            initial_arrays=to_array_record(initial.state_dict()),
            num_rounds=cfg.rounds,
            train_config=ConfigRecord(
                {CONFIG_LR: float(cfg.local_lr), CONFIG_STEPS: cfg.local_steps, CONFIG_BATCH: cfg.local.local_batch(cfg.batch_size)}
            ),
            evaluate_fn=central_evaluate,
        )

    return app, log


def _mean(values: Iterable[int]) -> int | float:
    """The mean, as an int when it is one (every client sent the same bytes)."""
    values = list(values)
    if not values:
        return 0
    total = sum(values)
    return total // len(values) if total % len(values) == 0 else total / len(values)


def _record_prefix(cfg: FederatedConfig) -> str:
    from gia_bench.capture import _safe_name
    from gia_bench.registry import parse_spec

    return f"{_safe_name(parse_spec(cfg.dataset).name)}-{_safe_name(parse_spec(cfg.model).name)}-"


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower logs every step at INFO and sends telemetry; a gia-bench run prints its own lines.

    Errors still show. Flower 1.42 also warns that ``run_simulation`` is deprecated in
    favour of ``flwr run`` (an app project and a SuperLink); it is still the in-process
    way to run a simulation, which is what a library call needs.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Ray's notice about a future default for accelerator env vars (clients here use no GPU)
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\..*")
            yield
    finally:
        logger.setLevel(level)


#: Runs a ServerApp with ``num_supernodes`` simulated clients of a ClientApp: (server_app, client_app, n, backend_config).
Engine = Callable[[Any, Any, int, dict[str, Any]], None]


def run_federated(cfg: FederatedConfig, events: Events = SILENT, engine: Engine | None = None) -> FederatedResult:
    """Run the FedAvg simulation of ``cfg``; write ``metrics.json`` and the captured rounds' records.

    ``engine`` runs the Flower apps; the default is Flower's simulation engine
    (:func:`flower_simulation`). The ``module:Class`` names in ``cfg.plugins`` are trusted
    throughout (and in the simulation's processes, through the environment). ``events``:
    ``on_start(rounds, "round", ...)``, then per round what :func:`make_server` says.
    """
    from gia_bench.registry import trusted

    with trusted(cfg.plugins):
        return _run_federated(cfg, events, engine)


def _run_federated(cfg: FederatedConfig, events: Events, engine: Engine | None) -> FederatedResult:
    require_flower()
    cfg.check()
    create_defense(cfg.defense)
    MODELS.kwargs_for(cfg.model)
    out = Path(cfg.out)
    engine = flower_simulation if engine is None else engine
    with _quiet_flower():
        setup = _setup(cfg)  # a bad data set or a too-small shard fails here, before Ray starts
        for client in range(cfg.clients):
            round_examples(setup.shards[client], cfg.batch_size, cfg.seed, 1, client)
        client_app = make_client_app(cfg)
        server_app, log = make_server(cfg, events)
        out.mkdir(parents=True, exist_ok=True)
        events.on_start(cfg.rounds, "round", f"{cfg.defense} on {cfg.clients} clients, {cfg.rounds} rounds")
        init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
        if cfg.num_cpus is not None:
            init_args["num_cpus"] = cfg.num_cpus
        start = time.perf_counter()
        backend = {"client_resources": {"num_cpus": cfg.cpus_per_client, "num_gpus": 0.0}, "init_args": init_args}
        engine(server_app, client_app, cfg.clients, backend)
        seconds = time.perf_counter() - start
    if len(log["rounds"]) != cfg.rounds:
        raise GiaBenchError(
            f"the Flower simulation finished {len(log['rounds'])} of {cfg.rounds} rounds (see Flower's errors above)"
        )
    setup = _setup(cfg)
    n_params = sum(int(math.prod(s)) for s in log["strategy"].param_shapes)
    metrics = {
        "kind": "federated",
        "config": _config_json(cfg),
        "model": setup.model_spec.spec,
        "defense": log["strategy"].compressor.spec,
        "fp32_bytes_per_client": 4 * n_params,
        "initial": log["initial"],
        "rounds": log["rounds"],
        "totals": {
            "final_test_accuracy": log["rounds"][-1]["test_accuracy"],
            "bytes_per_client": sum(r["bytes_per_client"] for r in log["rounds"]),
            "records": sum(1 for r in log["rounds"] for c in r["clients"] if c["record"]),
            "simulation_seconds": seconds,
        },
    }
    path = out / METRICS_FILE
    atomic_write_json(path, metrics)
    return FederatedResult(metrics, path)


def _config_json(cfg: FederatedConfig) -> dict[str, Any]:
    data = dataclasses.asdict(cfg)
    for key in ("out", "data_root"):
        data[key] = None if data[key] is None else str(data[key])
    data["capture_rounds"] = list(cfg.capture_rounds)
    data["plugins"] = list(cfg.plugins)
    return data

