"""Off-policy algorithms from replay: epsilon-greedy acting on Q-values, n-step transitions, uniform or prioritized tables.

A subclass (trainers/dqn.py) supplies its learner and, if its network is not a plain
[B, n_actions] Q-network, `q_values`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from titan_rl.adders import NStepAdder, transition_spec, with_extras
from titan_rl.algorithm import Actor, Adder, Algorithm, RecordSpec, TableSpec
from titan_rl.config import Config, range_metadata
from titan_rl.errors import ConfigError


@dataclass(frozen=True)
class OffPolicyConfig:
    """What every off-policy algorithm's YAML section (`algorithm.config`) holds."""

    gamma: float = field(default=0.99, metadata=range_metadata(0, 1))
    """Discount."""
    n_step: int = field(default=1, metadata=range_metadata(1, 100))
    """Steps per transition: actors sum n discounted rewards, the learner bootstraps with gamma**n."""
    epsilon_start: float = field(default=1.0, metadata=range_metadata(0, 1))
    """Exploration rate at env step 0 (buffer-wide), decayed linearly to `epsilon_final`."""
    epsilon_final: float | list[float] = 0.05
    """Final exploration rate: one value, or a list with one per rollout worker (e.g. an Ape-X spread)."""
    epsilon_decay_env_steps: int = field(default=10_000, metadata=range_metadata(0))
    """Env steps, counted by the buffer over every actor, over which epsilon decays; 0 = constant."""
    replay: str = field(default="uniform", metadata={"choices": ("uniform", "prioritized")})
    """How the replay table samples: uniformly, or proportionally to TD error (Schaul et al. 2016)."""
    priority_exponent: float = field(default=0.6, metadata=range_metadata(0, 1))
    """Prioritized replay: alpha (0 = uniform)."""
    importance_exponent_start: float = field(default=0.4, metadata=range_metadata(0, 1))
    """Prioritized replay: beta at env step 0, annealed linearly to 1."""
    importance_anneal_env_steps: int = field(default=0, metadata=range_metadata(0))
    """Prioritized replay: env steps over which beta reaches 1; 0 = budget.max_env_steps."""


def linear_schedule(start: float, end: float, decay_steps: int, step: int) -> float:
    """`start` at step 0, linearly to `end` at `decay_steps`, then `end` (at once when `decay_steps` is 0)."""
    if decay_steps <= 0 or step >= decay_steps:
        return end
    return start + (end - start) * step / decay_steps


class EpsilonGreedyActor(Actor):
    """Greedy on `q_values`, a uniformly random action with probability epsilon.

    Epsilon decays linearly on the buffer-wide env-step count (`env_steps`, set when weights
    arrive), so every worker of every replica follows one schedule.
    """

    def __init__(self, algorithm: OffPolicyAlgorithm, network: nn.Module, final_epsilon: float, seed: int):
        self.algorithm, self.network = algorithm, network
        self.final_epsilon = final_epsilon
        self.rng = np.random.default_rng(seed)

    @property
    def epsilon(self) -> float:
        c = self.algorithm.config
        return linear_schedule(c.epsilon_start, self.final_epsilon, c.epsilon_decay_env_steps, self.env_steps)

    def act(self, obs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        greedy = self.algorithm.greedy_actions(self.network, obs)
        explore = self.rng.random(len(obs)) < self.epsilon
        return np.where(explore, self.rng.integers(0, self.algorithm.env.n_actions, len(obs)), greedy), {}

    def metrics(self) -> dict[str, float]:
        return {"epsilon": self.epsilon}


class OffPolicyAlgorithm(Algorithm):
    """Learns from a replay table of n-step transitions; acts epsilon-greedily on `q_values`."""

    Config = OffPolicyConfig
    extras: ClassVar[RecordSpec] = {}
    """Per-step extras its actor returns from `act`, recorded with each transition from the step
    whose action it holds (an actor-side initial priority, as in Ape-X): a subclass whose actor
    returns any declares them here."""

    @classmethod
    def check_config(cls, cfg: Config, where: str) -> None:
        eps = cfg.algorithm.config.epsilon_final
        values = eps if isinstance(eps, list) else [eps]
        if isinstance(eps, list) and len(eps) != cfg.rollout_server.num_workers:
            workers = cfg.rollout_server.num_workers
            raise ConfigError(f"{where}: algorithm.config.epsilon_final has {len(eps)} values but rollout_server.num_workers={workers}")
        if any(not 0 <= e <= 1 for e in values):
            raise ConfigError(f"{where}: algorithm.config.epsilon_final={eps!r} must be in [0, 1]")

    def q_values(self, network: nn.Module, obs: torch.Tensor) -> torch.Tensor:
        """[B, n_actions] action values: what acting and evaluation maximise."""
        return network(obs)

    def greedy_actions(self, network: nn.Module, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.q_values(network, torch.as_tensor(obs)).argmax(dim=1).numpy()

    def check_network(self, network: nn.Module) -> None:
        super().check_network(network)
        if type(self).greedy_actions is OffPolicyAlgorithm.greedy_actions:  # actions are the argmax of q_values
            self.check_action_scores(network, self.q_values, "action values")

    def record_spec(self) -> RecordSpec:
        return with_extras(transition_spec(self.env.obs_shape, self.env.obs_dtype), self.extras)

    def table(self) -> TableSpec:
        c, t, b = self.config, self.cfg.train, self.cfg.buffer_server
        return TableSpec(
            kind=c.replay,
            capacity_items=b.capacity_items,
            samples_per_insert=t.updates_per_env_step * t.batch_size * t.learners,  # every learner samples its own batch
            min_size_to_sample=t.min_buffer_size,
            slack_items=b.rate_limit_slack_items,
            priority_exponent=c.priority_exponent,
            importance_exponent_start=c.importance_exponent_start,
            importance_anneal_env_steps=c.importance_anneal_env_steps or self.cfg.budget.max_env_steps,
            value_bounds={"action": (0, self.env.n_actions - 1)},
        )

    def make_actor(self, network: nn.Module, worker_index: int, seed: int) -> Actor:
        eps = self.config.epsilon_final
        final = eps[worker_index % len(eps)] if isinstance(eps, list) else float(eps)
        return EpsilonGreedyActor(self, network, final, seed)

    def make_adder(self, num_envs: int) -> Adder:
        return NStepAdder(num_envs, self.config.n_step, self.config.gamma, self.env.obs_shape, self.env.obs_dtype, self.extras)
