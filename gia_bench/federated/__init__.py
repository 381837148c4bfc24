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

Modules, one job each: :mod:`~gia_bench.federated.flower` (the optional Flower import, the
reply's keys), :mod:`~gia_bench.federated.mod` (the client mod),
:mod:`~gia_bench.federated.strategy` (the strategy wrapper and record writer),
:mod:`~gia_bench.federated.simulation` (``gia-bench federated``).
"""

from gia_bench.federated.flower import (
    BUFFERS_KEY,
    CONFIG_BATCH,
    CONFIG_LR,
    CONFIG_STEPS,
    FLOWER_INSTALL,
    HAVE_FLOWER,
    INFO_KEY,
    MESSAGES_KEY,
    PRIVATE_KEY,
    PUBLIC_KEY,
    STATE_KEY,
    UPDATE_KEY,
    FlowerMissingError,
    from_array_record,
    require_flower,
    to_array_record,
)
from gia_bench.federated.mod import DefenseMod
from gia_bench.federated.simulation import (
    MAX_CLIENTS,
    MAX_ROUNDS,
    METRICS_FILE,
    MIN_CPUS_PER_CLIENT,
    RECORDS_DIR,
    Engine,
    FederatedConfig,
    FederatedResult,
    evaluate,
    make_client_app,
    make_server,
    parse_rounds,
    round_examples,
    run_federated,
    shard_indices,
    train_locally,
)
from gia_bench.federated.strategy import CaptureStrategy, ClientUpdate, TruthFn

__all__ = [
    "BUFFERS_KEY", "CONFIG_BATCH", "CONFIG_LR", "CONFIG_STEPS", "FLOWER_INSTALL", "HAVE_FLOWER", "INFO_KEY",
    "MAX_CLIENTS", "MAX_ROUNDS", "MESSAGES_KEY", "METRICS_FILE", "MIN_CPUS_PER_CLIENT", "PRIVATE_KEY",
    "PUBLIC_KEY", "RECORDS_DIR", "STATE_KEY", "UPDATE_KEY", "CaptureStrategy", "ClientUpdate", "DefenseMod",
    "Engine", "FederatedConfig", "FederatedResult", "FlowerMissingError", "TruthFn", "evaluate",
    "from_array_record", "make_client_app", "make_server", "parse_rounds", "require_flower", "round_examples",
    "run_federated", "shard_indices", "to_array_record", "train_locally",
]  # fmt: skip
