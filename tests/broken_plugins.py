"""Algorithms with a bug a plugin's author could make, each DQN with one thing wrong: the tests check
that each is reported naming what is wrong, not run until a budget ends."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from titan_rl.algorithm import Actor, Adder, Batch, EnvStep, RecordSpec
from trainers.dqn import DQN, DQNLearner

Records = dict[str, np.ndarray]


class _ChangedRecords(Adder):
    def __init__(self, adder: Adder, change: Callable[[Records], Records]):
        self.adder, self.change = adder, change

    def add(self, step: EnvStep) -> Records:
        return self.change(self.adder.add(step))


class WritesAnUndeclaredField(DQN):
    def make_adder(self, num_envs: int) -> Adder:
        return _ChangedRecords(super().make_adder(num_envs), lambda r: {**r, "value": np.zeros(len(r["reward"]), np.float32)})


class DeclaresAFieldItNeverWrites(DQN):
    def record_spec(self) -> RecordSpec:
        return {**super().record_spec(), "value": ((), np.dtype(np.float32))}


class WritesActionsOfAnotherDtype(DQN):
    def make_adder(self, num_envs: int) -> Adder:
        return _ChangedRecords(super().make_adder(num_envs), lambda r: {**r, "action": r["action"].astype(np.int32)})


class FailsOnceTraining(DQN):
    """Acts as DQN until its weights come from a learner that has learned from some env steps, then
    raises in every worker at its first step: what the launcher's preflight, acting with the
    untrained network, cannot see."""

    def make_actor(self, network: nn.Module, worker_index: int, seed: int) -> Actor:
        actor = super().make_actor(network, worker_index, seed)
        act = actor.act

        def act_until_trained(obs: np.ndarray) -> tuple[np.ndarray, Records]:
            if actor.env_steps > 0:
                raise RuntimeError("a bug in this actor, met once training has started")
            return act(obs)

        actor.act = act_until_trained
        return actor


class _NoPriorities(DQNLearner):
    def _update(self, batch: Batch) -> dict[str, float]:
        metrics = super()._update(batch)
        batch.new_priorities = None  # as a learner written without prioritized replay in mind leaves them
        return metrics


class SetsNoPriorities(DQN):
    learner_class = _NoPriorities
