"""The server side: :class:`CaptureStrategy` decodes :class:`~gia_bench.federated.mod.DefenseMod` replies
for any Flower strategy and writes the captured rounds' client updates as FedAvg records."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch

from gia_bench.defenses import create as create_defense
from gia_bench.errors import CompressorError
from gia_bench.fedavg import LocalTraining
from gia_bench.federated.flower import (
    BUFFERS_KEY,
    INFO_KEY,
    MESSAGES_KEY,
    PRIVATE_KEY,
    PUBLIC_KEY,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
    Strategy,
    from_array_record,
    require_flower,
    to_array_record,
)
from gia_bench.models import build_recorded
from gia_bench.receiver import check_record
from gia_bench.records import RECORD_SUFFIX, GradientRecord, RecordMeta, Truth, write_pair
from gia_bench.specs import DatasetSpec, ModelSpec

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


@dataclasses.dataclass(frozen=True)
class ClientReply:
    """What one client's :class:`~gia_bench.federated.mod.DefenseMod` reply carries for the server."""

    client: int
    examples: int  # the client's private examples this round (the record's batch)
    local: LocalTraining  # its public FedAvg metadata: K steps, local_lr, local_batch
    messages: dict[str, torch.Tensor]  # the defense's messages, tag -> tensor
    infos: tuple[dict[str, Any], ...]  # Message.info() of each, in send order
    bytes: int  # the messages' bytes
    public: dict[str, torch.Tensor]  # the compressor's public state
    buffers: dict[str, torch.Tensor]  # non-parameter arrays (BatchNorm statistics)
    private: dict[str, torch.Tensor]  # the residual, only from DefenseMod(send_private=True): truth file only


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
            probe, _ = build_recorded(model, seed=None, device=None)
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
        sent = self._read(content)
        decoded = self.compressor.decode(sent.messages, self.param_shapes, sent.public)
        weights = {k: v.clone() for k, v in w0.items()}
        for name, u in zip(self.param_names, decoded):
            weights[name] = (w0[name].to(torch.float32) - sent.local.lr * u.to(torch.float32)).to(w0[name].dtype)
        unknown = [k for k in sent.buffers if k not in weights or k in self.param_names]
        if unknown:
            raise CompressorError(f"CaptureStrategy: the client sent unknown arrays {unknown[:3]}")
        weights.update(sent.buffers)
        record_path = self._save_record(server_round, sent, w0) if self.capturing(server_round) else None
        buffer_bytes = sum(t.numel() * t.element_size() for t in sent.buffers.values())
        self.updates.append(ClientUpdate(server_round, sent.client, sent.examples, sent.bytes, buffer_bytes, record_path))
        new = RecordDict()
        for key, record in content.items():
            if key not in (MESSAGES_KEY, PUBLIC_KEY, BUFFERS_KEY, INFO_KEY, PRIVATE_KEY):
                new[key] = record
        new[self.arrays_key] = to_array_record(weights)
        reply.content = new

    def _read(self, content: RecordDict) -> ClientReply:
        """The gia-bench part of a client's reply, checked against the server's defense and model."""
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
        local = LocalTraining(int(info["local-steps"]), float(info["local-lr"]), int(info["local-batch"]))
        return ClientReply(
            int(info["client"]), int(info["examples"]), local, messages, infos, sent, public, buffers, private
        )

    def _save_record(self, server_round: int, sent: ClientReply, w0: dict[str, torch.Tensor]) -> Path:
        """Write the record and, where the caller knows the batch, its truth file with the client's private residual."""
        assert self.out is not None
        rid = f"{self.record_prefix}r{server_round:03d}-c{sent.client:03d}"
        meta = RecordMeta(
            record_id=rid,
            defense=self.compressor.spec,
            model=self.model_spec,
            dataset=self.dataset_spec,
            batch_size=sent.examples,
            param_names=self.param_names,
            messages=sent.infos,
            bytes_sent=sent.bytes,
            step=server_round - 1,
            seed=self.seed,
            extra={"source": "federated", "round": server_round, "client": sent.client},
            **sent.local.meta_fields(sent.examples),
        )
        record = GradientRecord(meta, sent.messages, {k: v.clone() for k, v in w0.items()}, sent.public)
        check_record(record)
        self.out.mkdir(parents=True, exist_ok=True)
        batch = None if self.truth_fn is None else self.truth_fn(server_round, sent.client)
        # the client's private residual goes to the truth file only (the oracle view's input), never the record
        truth = None
        if batch is not None:
            truth = Truth(batch[0].detach().cpu(), batch[1].detach().cpu().to(torch.int64), rid, sent.private)
        return write_pair(self.out / f"{rid}{RECORD_SUFFIX}", record, truth)

