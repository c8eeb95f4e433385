"""Shared fixtures: configs, and real gRPC servers on free 127.0.0.1 ports."""

from __future__ import annotations

import os

import pytest

from tests.helpers import serving_buffer

os.environ["WANDB_MODE"] = "disabled"  # inherited by every service a test starts


@pytest.fixture
def buffer_server():
    """A real buffer service (DQN's uniform table) on a free port, no rate limit worth mentioning; yields (address, table)."""
    with serving_buffer() as served:
        yield served
