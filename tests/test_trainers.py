"""Contract tests every trainer gets for free, plus DQN's own behaviour on fixed batches."""

import io

import numpy as np
import pytest
import torch

from models.simple_policy import SimplePolicy
from tests.helpers import make_config
from titan_rl.registry import build
from trainers.base import Trainer
from trainers.dqn import DQNTrainer

TRAINER_PATHS = ["trainers.dqn.DQNTrainer"]


def fixed_batch(n=32, seed=0, terminated=False):
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, 4)).astype(np.float32)
    return {
        "obs": obs,
        "action": rng.integers(0, 2, n),
        "reward": np.ones(n, np.float32),
        "next_obs": (obs + 0.1).astype(np.float32),
        "terminated": np.full(n, terminated),
        "truncated": np.zeros(n, bool),
    }


def make_trainer(path="trainers.dqn.DQNTrainer", *overrides):
    cfg = make_config(f"trainer.path={path}", *overrides)
    torch.manual_seed(0)
    return build(cfg.trainer, "trainer", SimplePolicy(4, 2, [32, 32]), cfg.train)


@pytest.mark.parametrize("path", TRAINER_PATHS)
def test_update_returns_finite_metrics_and_changes_the_policy(path):
    trainer = make_trainer(path)
    assert isinstance(trainer, Trainer)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    metrics = trainer.update(fixed_batch())
    assert metrics and all(np.isfinite(v) for v in metrics.values())
    assert trainer.updates == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(), strict=True))


@pytest.mark.parametrize("path", TRAINER_PATHS)
def test_state_round_trips_through_a_weights_only_load(path):
    trainer = make_trainer(path)
    for i in range(3):
        trainer.update(fixed_batch(seed=i))
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    buffer.seek(0)
    restored = make_trainer(path)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.updates == 3
    a, b = trainer.update(fixed_batch(seed=9)), restored.update(fixed_batch(seed=9))
    assert a == pytest.approx(b)


def test_terminal_transitions_regress_to_the_reward_alone():
    trainer = make_trainer("trainers.dqn.DQNTrainer", "train.lr=0.01", "train.target_update_every_updates=1")
    batch = fixed_batch(terminated=True)
    for _ in range(300):
        trainer.update(batch)
    q = trainer.policy(torch.as_tensor(batch["obs"])).gather(1, torch.as_tensor(batch["action"]).unsqueeze(1))
    assert q.detach().numpy() == pytest.approx(1.0, abs=0.1)  # reward 1, no bootstrap


@pytest.mark.parametrize(("n_step", "expected"), [(1, 2.0), (2, 1.5)])
def test_non_terminal_transitions_bootstrap_from_the_target_network_with_gamma_to_the_n(n_step, expected):
    # target net predicts 2 everywhere -> TD target = 1 + 0.5**n_step * 2
    trainer = make_trainer(
        "trainers.dqn.DQNTrainer", "train.gamma=0.5", f"train.n_step={n_step}", "train.lr=0.01", "train.target_update_every_updates=1000000"
    )
    with torch.no_grad():
        last = trainer.target.net[-1]
        last.weight.zero_()
        last.bias.fill_(2.0)
    batch = fixed_batch()
    for _ in range(300):
        trainer.update(batch)
    q = trainer.policy(torch.as_tensor(batch["obs"])).gather(1, torch.as_tensor(batch["action"]).unsqueeze(1))
    assert q.detach().numpy() == pytest.approx(expected, abs=0.15)


def test_target_network_syncs_every_n_updates():
    trainer = make_trainer("trainers.dqn.DQNTrainer", "train.target_update_every_updates=3")
    assert isinstance(trainer, DQNTrainer)
    first = [p.clone() for p in trainer.target.parameters()]
    trainer.update(fixed_batch())
    trainer.update(fixed_batch())
    assert all(torch.equal(a, b) for a, b in zip(first, trainer.target.parameters(), strict=True))
    trainer.update(fixed_batch())
    assert all(torch.equal(a, b) for a, b in zip(trainer.policy.parameters(), trainer.target.parameters(), strict=True))


def test_unknown_trainer_kwargs_are_a_config_error():
    from titan_rl.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot build trainers.dqn.DQNTrainer"):
        make_trainer("trainers.dqn.DQNTrainer", "trainer.kwargs={bogus: 1}")


def test_polyak_target_update_moves_the_target_a_fraction_toward_the_online_net():
    trainer = make_trainer("trainers.dqn.DQNTrainer", "train.target_update_every_updates=1", "train.target_update_tau=0.25")
    before = [p.clone() for p in trainer.target.parameters()]
    trainer.update(fixed_batch())
    for old, new, online in zip(before, trainer.target.parameters(), trainer.policy.parameters(), strict=True):
        torch.testing.assert_close(new, old + 0.25 * (online - old))
