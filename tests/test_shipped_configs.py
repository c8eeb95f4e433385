"""Every config in config/ builds and learns a few steps on its own env: its policy fits the env's
observations and actions, its actors step the real env, and its learner updates on what they stored.
How well each one learns is measured in docs/results.md, not here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import REPO, make_config_from
from titan_rl.algorithm import to_batch
from titan_rl.envs import env_spec
from titan_rl.registry import build_algorithm, build_policy
from titan_rl.rollout.actor import VectorActor

CONFIGS = sorted(f"config/{p.name}" for p in (REPO / "config").glob("*.yaml"))
UPDATES = 3


def test_the_real_task_configs_are_shipped():
    assert {"config/acrobot.yaml", "config/mountaincar.yaml", "config/lunarlander.yaml", "config/minatar_breakout.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
def test_a_shipped_config_builds_steps_its_env_and_updates(path):
    cfg = make_config_from(path, "train.batch_size=32")
    algorithm = build_algorithm(cfg)
    torch.manual_seed(0)
    network = build_policy(cfg)
    algorithm.check_network(network)
    spec = env_spec(cfg)
    actor = VectorActor(cfg.rollout_server.env_name, 4, algorithm.make_actor(network, 0, seed=0), algorithm.make_adder(4), seed=0)
    parts: list[dict[str, np.ndarray]] = []
    try:
        while sum(len(p["reward"]) for p in parts) < 32 * UPDATES:
            parts.append(actor.step().records)
    finally:
        actor.close()
    records = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert records["obs"].shape[-len(spec.obs_shape) :] == spec.obs_shape  # a row may hold a sequence of them
    assert greedy_in_range(algorithm, network, records["obs"].reshape(-1, *spec.obs_shape), spec.n_actions)
    learner = algorithm.make_learner(network)
    for i in range(UPDATES):
        rows = {k: v[32 * i : 32 * (i + 1)] for k, v in records.items()}
        weights = np.ones(32, np.float32) if algorithm.table().kind == "prioritized" else None
        metrics = learner.update(to_batch(rows, np.arange(32), weights))
        assert metrics and all(np.isfinite(v) for v in metrics.values()), metrics
    assert learner.updates == UPDATES


def greedy_in_range(algorithm, network, obs: np.ndarray, n_actions: int) -> bool:
    actions = algorithm.greedy_actions(network, obs[:8])
    return actions.shape == (8,) and bool(((actions >= 0) & (actions < n_actions)).all())
