"""DQN (Mnih et al. 2015) with Rainbow-style options: double Q, n-step returns, prioritized replay, a dueling head.

- double Q, n-step, the loss: `algorithm.config` (double_q, n_step, loss);
- prioritized replay: `algorithm.config.replay: prioritized` (the buffer's table samples by TD error);
- dueling: `policy.path: models.dueling.DuelingMLP` (any [B, n_actions] Q-network fits).

The TD loss is `DQNLearner.loss`: a variant with a new loss (see trainers/qr_dqn.py) replaces that
method alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.simple_policy import SimplePolicy
from titan_rl.algorithm import Batch, Learner
from titan_rl.config import LEARNER_ONLY, range_metadata
from titan_rl.config import Config as RunConfig
from titan_rl.errors import ConfigError
from titan_rl.off_policy import OffPolicyAlgorithm, OffPolicyConfig, linear_schedule

PRIORITY_EPSILON = 1e-6
"""Added to |TD error| so no item's priority is ever 0."""


@dataclass(frozen=True)
class DQNConfig(OffPolicyConfig):
    """DQN's section of the YAML (`algorithm.config`), on top of every off-policy algorithm's keys."""

    lr: float = field(default=1e-3, metadata=range_metadata(0, 10, learner_only=True))
    """Adam learning rate (at env step 0 when `lr_final` is set)."""
    lr_final: float | None = field(default=None, metadata=range_metadata(0, 10, learner_only=True))
    """Learning rate reached at `lr_decay_end_env_steps`, linearly from `lr`, then kept; null keeps
    `lr`. A decay makes the last policy of a run settle rather than oscillate."""
    lr_decay_start_env_steps: int = field(default=0, metadata=range_metadata(0, learner_only=True))
    """Env step (buffer-wide) where the decay starts: `lr` until then, so early learning keeps its pace."""
    lr_decay_end_env_steps: int = field(default=0, metadata=range_metadata(0, learner_only=True))
    """Env step where the learning rate reaches `lr_final`; 0 = budget.max_env_steps, and a budget
    that ends before the decay starts keeps `lr` throughout (a short run of a config that decays)."""
    target_update_every_updates: int = field(default=250, metadata=range_metadata(1, learner_only=True))
    """Target-network sync period in updates (1 with a small tau: Polyak averaging every update)."""
    target_update_tau: float = field(default=1.0, metadata=range_metadata(0.0001, 1, learner_only=True))
    """Each sync moves the target this far toward the online net: 1 copies it."""
    max_grad_norm: float = field(default=10.0, metadata=range_metadata(0, learner_only=True))
    """Gradient-norm clip; 0 disables clipping."""
    double_q: bool = field(default=True, metadata=LEARNER_ONLY)
    """The online net picks the next action, the target net scores it (van Hasselt et al. 2016)."""
    loss: str = field(default="huber", metadata={**LEARNER_ONLY, "choices": ("huber", "mse")})
    """Per-item TD loss."""


class LossOutput(NamedTuple):
    per_item: torch.Tensor  # [B] loss of each sampled item, before importance weighting
    priorities: torch.Tensor  # [B] new priority of each item (used by a prioritized table)
    metrics: dict[str, float]


class DQNLearner(Learner):
    def __init__(self, network: nn.Module, config: DQNConfig, *, lr_decay_end_env_steps: int):
        """`lr_decay_end_env_steps`: the resolved `config.lr_decay_end_env_steps` (the budget where that is 0)."""
        super().__init__(network)
        self.config = config
        self.lr_decay_end_env_steps = lr_decay_end_env_steps
        self.target = copy.deepcopy(network).requires_grad_(False)
        # state_dict values share storage with the modules, so these pairs stay valid across updates
        pairs = list(zip(self.target.state_dict().values(), network.state_dict().values(), strict=True))
        self._float_pairs = [(t, o) for t, o in pairs if t.is_floating_point()]
        self._other_pairs = [(t, o) for t, o in pairs if not t.is_floating_point()]
        self.optimizer = torch.optim.Adam(network.parameters(), lr=config.lr, fused=True)  # fused: ~15% faster per update on CPU

    def bootstrap_discount(self, batch: Batch) -> torch.Tensor:
        """gamma**n where the next state may be bootstrapped from, 0 at a true terminal.

        Only a termination stops bootstrapping; a time-limit truncation still bootstraps. The
        reward already sums n discounted rewards (the actors' n-step adder built it)."""
        c = self.config
        return c.gamma**c.n_step * (1.0 - batch["terminated"].float())

    def loss(self, batch: Batch) -> LossOutput:
        obs, next_obs = batch["obs"], batch["next_obs"]
        action = batch["action"].long()
        with torch.no_grad():  # TD target from the frozen network
            next_q_target = self.target(next_obs)
            if self.config.double_q:  # the online net picks the action, the target net scores it
                next_action = self.network(next_obs).argmax(dim=1, keepdim=True)
                next_value = next_q_target.gather(1, next_action).squeeze(1)
            else:
                next_value = next_q_target.max(dim=1).values
            td_target = batch["reward"].float() + self.bootstrap_discount(batch) * next_value
        q = self.network(obs).gather(1, action.unsqueeze(1)).squeeze(1)
        if self.config.loss == "huber":
            per_item = F.smooth_l1_loss(q, td_target, reduction="none")
        else:
            per_item = F.mse_loss(q, td_target, reduction="none")
        return LossOutput(per_item, (q - td_target).detach().abs(), {"losses/q_values": q.mean().item()})

    def _update(self, batch: Batch) -> dict[str, float]:
        out = self.loss(batch)
        # prioritized replay: importance weights undo the skew of sampling by priority
        loss = (out.per_item * batch.weights).mean() if batch.weights is not None else out.per_item.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        c = self.config
        lr = self.learning_rate()  # set every update: a resumed optimizer state holds the lr it was saved with
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), c.max_grad_norm, foreach=True)
            if c.max_grad_norm > 0
            else torch.tensor(0.0)
        )
        self.optimizer.step()
        if batch.weights is not None:
            batch.new_priorities = (out.priorities + PRIORITY_EPSILON).cpu().numpy()
        if (self.updates + 1) % c.target_update_every_updates == 0:  # self.updates counts earlier updates
            self._sync_target()
        return {"losses/td_loss": loss.item(), **out.metrics, "losses/grad_norm": float(grad_norm), "charts/learning_rate": lr}

    def learning_rate(self) -> float:
        """`lr` until `lr_decay_start_env_steps`, then linearly to `lr_final` at the decay's end."""
        c = self.config
        start = c.lr_decay_start_env_steps
        if c.lr_final is None or self.lr_decay_end_env_steps <= start:
            return c.lr
        return linear_schedule(c.lr, c.lr_final, self.lr_decay_end_env_steps - start, max(self.env_steps - start, 0))

    @torch.no_grad()
    def _sync_target(self) -> None:
        """Copy the online net into the target (tau = 1) or move the target toward it (Polyak averaging)."""
        tau = self.config.target_update_tau
        targets, online = [t for t, _ in self._float_pairs], [o for _, o in self._float_pairs]
        if tau == 1.0:
            torch._foreach_copy_(targets, online)
        else:
            torch._foreach_lerp_(targets, online, tau)
        for t, o in self._other_pairs:
            t.copy_(o)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "target": self.target.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.target.load_state_dict(state["target"])


class DQN(OffPolicyAlgorithm):
    """Epsilon-greedy actors, n-step transitions in a uniform or prioritized replay table, a TD learner."""

    Config = DQNConfig
    learner_class: ClassVar[type[DQNLearner]] = DQNLearner
    """What `make_learner` builds: a variant with its own loss sets its subclass (trainers/qr_dqn.py)."""

    @classmethod
    def check_config(cls, cfg: RunConfig, where: str) -> None:
        super().check_config(cfg, where)
        c = cfg.algorithm.config
        if c.lr_final is not None and c.lr_decay_end_env_steps and c.lr_decay_start_env_steps >= c.lr_decay_end_env_steps:
            raise ConfigError(
                f"{where}: algorithm.config.lr_decay_start_env_steps={c.lr_decay_start_env_steps} must come before "
                f"lr_decay_end_env_steps={c.lr_decay_end_env_steps}"
            )

    def make_learner(self, network: nn.Module) -> DQNLearner:
        return self.learner_class(
            network, self.config, lr_decay_end_env_steps=self.config.lr_decay_end_env_steps or self.cfg.budget.max_env_steps
        )

    def tiny_network(self) -> nn.Module:
        return SimplePolicy(math.prod(self.env.obs_shape), self.env.n_actions, [32])
