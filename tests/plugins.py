"""Plugins the tests build: algorithms with a bug a plugin's author could make, each DQN with one
thing wrong, which must be reported naming what is wrong, not run until a budget ends; and ones with
no bug that the checks must not refuse (`BatchNormPolicy`, `ActsOnTheMeanOfAtoms`, `RecordsItsActionValue`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
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


class NamesAnExtraLikeAField(DQN):
    extras = {"reward": ((), np.dtype(np.float32))}  # would replace the n-step return


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


class CannotBeBuilt(DQN):
    def __init__(self, *args: object, **kwargs: object):
        raise RuntimeError("a bug in this algorithm's constructor")


class BatchNormPolicy(nn.Module):
    """Fits only in eval mode, as workers act: in training mode batch norm refuses a batch of one observation."""

    def __init__(self, state_dim: int, action_dim: int, hidden_sizes: list[int]):
        super().__init__()
        width = hidden_sizes[0]
        self.net = nn.Sequential(nn.Linear(state_dim, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, action_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class ActsOnTheMeanOfAtoms(DQN):
    """Overrides greedy_actions alone, for a network with an atoms axis ([B, actions, atoms]): its
    q_values are not what it acts on, so they are not held to [B, actions]."""

    def greedy_actions(self, network: nn.Module, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return network(torch.as_tensor(obs)).mean(dim=2).argmax(dim=1).numpy()


class RecordsItsActionValue(DQN):
    """An Ape-X-style actor: each transition records the value of the action taken, from which an
    initial priority can be computed without the learner."""

    extras = {"q_taken": ((), np.dtype(np.float32))}

    def make_actor(self, network: nn.Module, worker_index: int, seed: int) -> Actor:
        actor = super().make_actor(network, worker_index, seed)
        act = actor.act

        def act_and_score(obs: np.ndarray) -> tuple[np.ndarray, Records]:
            actions, extras = act(obs)
            with torch.no_grad():
                q = self.q_values(network, torch.as_tensor(obs))
            q_taken = q[torch.arange(len(actions)), torch.as_tensor(actions)].numpy().astype(np.float32)
            return actions, {**extras, "q_taken": q_taken}

        actor.act = act_and_score
        return actor


class ActivationPolicy(nn.Module):
    """A one-layer Q-network whose activation is a keyword defaulting to a function: its default reads
    "<function relu at 0x...>" as text, another address in every process."""

    def __init__(self, state_dim: int, action_dim: int, activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu):
        super().__init__()
        self.activation = activation
        self.hidden, self.out = nn.Linear(state_dim, 16), nn.Linear(16, action_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.out(self.activation(self.hidden(obs.float())))
