"""On-policy actor-learners: actors sample from the policy's logits and send fixed-length
segments with their behaviour log-probs through a FIFO table (IMPALA, APPO).

A subclass (trainers/impala.py) supplies its learner and, if its network does not return
`(logits, value)`, `policy_logits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from titan_rl.adders import SegmentAdder, segment_spec
from titan_rl.algorithm import Actor, Adder, Algorithm, RecordSpec, TableSpec
from titan_rl.config import Config, range_metadata
from titan_rl.errors import ConfigError


@dataclass(frozen=True)
class OnPolicyConfig:
    """What every on-policy algorithm's YAML section (`algorithm.config`) holds."""

    gamma: float = field(default=0.99, metadata=range_metadata(0, 1))
    """Discount."""
    segment_length: int = field(default=20, metadata=range_metadata(1, 10_000))
    """Env steps per record: each actor env sends segments of this many consecutive steps."""
    queue_capacity_segments: int = field(default=256, metadata=range_metadata(1))
    """The FIFO table's size: actors wait while it is full, which bounds how stale queued data gets."""
    max_policy_lag: int = field(default=0, metadata=range_metadata(0))
    """Drop segments acted by weights more than this many versions older than the learner's; 0 keeps all."""


class SamplingActor(Actor):
    """Samples each action from softmax(logits) (Gumbel-max, seeded) and records its log-probability."""

    def __init__(self, algorithm: OnPolicyAlgorithm, network: nn.Module, seed: int):
        self.algorithm, self.network = algorithm, network
        self.rng = np.random.default_rng(seed)

    def act(self, obs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with torch.no_grad():
            log_probs = torch.log_softmax(self.algorithm.policy_logits(self.network, torch.as_tensor(obs)), dim=-1).numpy()
        gumbel = -np.log(-np.log(self.rng.random(log_probs.shape)))
        actions = np.argmax(log_probs + gumbel, axis=1)
        return actions, {"log_prob": log_probs[np.arange(len(actions)), actions].astype(np.float32)}


class OnPolicyAlgorithm(Algorithm):
    """Learns from a FIFO table of trajectory segments acted by a sampling policy."""

    Config = OnPolicyConfig
    extras: ClassVar[RecordSpec] = {"log_prob": ((), np.dtype(np.float32))}
    """Per-step extras its actor returns from `act` and each segment records ([segment_length, *shape]):
    the behaviour policy's log-probability of its action. A subclass whose actor returns more (the
    value at acting time, say) declares them here too."""

    @classmethod
    def check_config(cls, cfg: Config, where: str) -> None:
        c = cfg.algorithm.config
        if cfg.train.learners > 1:  # each learner would read its own queue items under its own policy-lag bound
            raise ConfigError(
                f"{where}: train.learners={cfg.train.learners}: data-parallel learners need a replay table, "
                f"{cls.__name__} learns from a queue"
            )
        if cfg.train.batch_size > c.queue_capacity_segments:
            raise ConfigError(
                f"{where}: train.batch_size={cfg.train.batch_size} segments exceeds "
                f"algorithm.config.queue_capacity_segments={c.queue_capacity_segments}"
            )

    def policy_logits(self, network: nn.Module, obs: torch.Tensor) -> torch.Tensor:
        """[B, n_actions] unnormalised log-probabilities; the default reads a `(logits, value)` network."""
        return network(obs)[0]

    def greedy_actions(self, network: nn.Module, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.policy_logits(network, torch.as_tensor(obs)).argmax(dim=1).numpy()

    def check_network(self, network: nn.Module) -> None:
        super().check_network(network)
        if type(self).greedy_actions is OnPolicyAlgorithm.greedy_actions:  # actions are the argmax of policy_logits
            self.check_action_scores(network, self.policy_logits, "action logits")

    def record_spec(self) -> RecordSpec:
        return segment_spec(self.config.segment_length, self.env.obs_shape, self.env.obs_dtype, self.extras)

    def table(self) -> TableSpec:
        c = self.config
        return TableSpec(
            kind="fifo",
            capacity_items=c.queue_capacity_segments,
            max_policy_lag=c.max_policy_lag,
            value_bounds={"action": (0, self.env.n_actions - 1), "log_prob": (-np.inf, 0.0)},
        )

    def make_actor(self, network: nn.Module, worker_index: int, seed: int) -> Actor:
        return SamplingActor(self, network, seed)

    def make_adder(self, num_envs: int) -> Adder:
        c = self.config
        return SegmentAdder(num_envs, c.segment_length, self.env.obs_shape, self.env.obs_dtype, self.extras)
