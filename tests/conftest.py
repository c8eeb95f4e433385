"""Shared fixtures: configs, and real gRPC servers on free 127.0.0.1 ports."""

from __future__ import annotations

import os

import pytest

from tests.helpers import make_config

os.environ["WANDB_MODE"] = "disabled"  # inherited by every service a test starts


@pytest.fixture
def buffer_server():
    """A real buffer service (DQN's uniform table) on a free port, no rate limit worth mentioning; yields (address, table)."""
    from titan_rl.buffer.__main__ import start

    cfg = make_config(
        "buffer_server.port=0",
        "buffer_server.capacity_items=1000",
        "train.min_buffer_size=64",
        "buffer_server.rate_limit_slack_items=1000000",
    )
    server, port, tables = start(cfg)
    (table,) = tables.values()
    yield f"127.0.0.1:{port}", table
    for t in tables.values():
        t.close()
    server.stop(grace=None).wait()
