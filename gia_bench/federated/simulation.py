"""``gia-bench federated``: a Flower simulation of FedAvg clients with IID shards, local training, and records.

Flower's own simulation engine (on Ray) runs clients holding IID shards of a data set,
each training locally (:func:`train_locally`) behind a :class:`~gia_bench.federated.mod.DefenseMod`,
and a server running FedAvg inside a :class:`~gia_bench.federated.strategy.CaptureStrategy`;
writes ``metrics.json`` and, for the captured rounds, records plus the truth files of the
clients' private examples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gia_bench.data import ImageDataset, load_dataset
from gia_bench.defenses import create as create_defense
from gia_bench.errors import GiaBenchError, SpecError
from gia_bench.events import SILENT, Events
from gia_bench.fedavg import LocalTraining, step_indices
from gia_bench.federated.flower import (
    CONFIG_BATCH,
    CONFIG_LR,
    CONFIG_STEPS,
    UPDATE_KEY,
    ArrayRecord,
    ConfigRecord,
    Context,
    FedAvg,
    Message,
    MetricRecord,
    RecordDict,
    from_array_record,
    require_flower,
    to_array_record,
)
from gia_bench.federated.mod import DefenseMod
from gia_bench.federated.strategy import CaptureStrategy
from gia_bench.flower_engine import flower_simulation  # the default Engine (Ctrl-C stops it)
from gia_bench.io import atomic_write_json
from gia_bench.models import MODELS, build_model, build_recorded
from gia_bench.records import RECORD_SUFFIX
from gia_bench.specs import ModelSpec

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
        from gia_bench.record_checks import MAX_BATCH

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
        _, model_spec = build_recorded(ModelSpec.for_data(cfg.model, spec, "train"), seed=cfg.seed, device="cpu")
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
    from gia_bench.capture import record_prefix

    return record_prefix(cfg.dataset, cfg.model)


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


