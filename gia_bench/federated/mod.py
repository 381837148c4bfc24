"""The client mod: a Flower client's FedAvg update through a gia-bench defense (:class:`DefenseMod`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import torch

from gia_bench.comm import LocalCommunicator, messages_by_tag
from gia_bench.defenses import create as create_defense
from gia_bench.defenses.base import Compressor
from gia_bench.errors import CompressorError
from gia_bench.fedavg import LocalTraining
from gia_bench.federated.flower import (
    BUFFERS_KEY,
    CONFIG_BATCH,
    CONFIG_LR,
    CONFIG_STEPS,
    INFO_KEY,
    MESSAGES_KEY,
    PRIVATE_KEY,
    PUBLIC_KEY,
    STATE_KEY,
    UPDATE_KEY,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
    _load_state,
    _save_state,
    from_array_record,
    require_flower,
    to_array_record,
)

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

