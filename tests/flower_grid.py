"""Flower without Ray for tests: a Grid that calls the ClientApp in this process, and the Engine fixture on it.

Imported by the federated tests (``from flower_grid import in_process``); needs ``flwr``.
"""

from __future__ import annotations

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """A Grid that hands each message straight to the ClientApp, with one persistent Context per node."""

    def __init__(self, client_app, n: int) -> None:
        self.app = client_app
        self.contexts = {
            i + 1: Context(
                run_id=1, node_id=i + 1, node_config={"partition-id": i, "num-partitions": n},
                state=RecordDict(), run_config={},
            )
            for i in range(n)
        }

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


@pytest.fixture
def in_process(monkeypatch):
    """An Engine running the apps in this process; keeps the grid so tests can read the clients' contexts."""
    for key, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, key, value)
    grids: list[InProcessGrid] = []

    def engine(server_app, client_app, n, backend_config) -> None:
        assert backend_config["client_resources"]["num_cpus"] > 0
        grid = InProcessGrid(client_app, n)
        grids.append(grid)
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))

    engine.grids = grids
    return engine
