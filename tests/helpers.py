"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from titan_rl.buffer.table import Table

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "config" / "cartpole.yaml"


def make_config(*overrides: str):
    return make_config_from(DEFAULT_CONFIG, *overrides)


def make_config_from(path: str | Path, *overrides: str):
    """A config file of the repository (relative to its root) with overrides."""
    from titan_rl.config import load_config

    return load_config(REPO / path, list(overrides))


def transitions(n: int, obs_dim: int = 4, seed: int = 0, start: float = 0.0) -> dict[str, np.ndarray]:
    """n well-formed CartPole-like transitions; obs[:, 0] counts up from `start` so order can be checked."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, obs_dim)).astype(np.float32)
    obs[:, 0] = start + np.arange(n)
    return {
        "obs": obs,
        "action": rng.integers(0, 2, n).astype(np.int64),
        "reward": np.ones(n, dtype=np.float32),
        "next_obs": obs + 1,
        "terminated": np.zeros(n, dtype=bool),
        "truncated": np.zeros(n, dtype=bool),
    }


@contextlib.contextmanager
def serving_buffer(config: str | Path = DEFAULT_CONFIG, *overrides: str) -> Iterator[tuple[str, Table]]:
    """A real buffer service, started as `python -m titan_rl.buffer` starts it, on a free port: its one
    table holds at most 1000 items and its rate limiter holds nobody back. Yields (address, table)."""
    from titan_rl.buffer.process import start

    cfg = make_config_from(
        config,
        "buffer_server.port=0",
        "buffer_server.capacity_items=1000",
        "train.min_buffer_size=64",
        "buffer_server.rate_limit_slack_items=1000000000",
        *overrides,
    )
    server, port, tables = start(cfg)
    (table,) = tables.values()
    try:
        yield f"127.0.0.1:{port}", table
    finally:
        table.close()
        server.stop(grace=None).wait()
