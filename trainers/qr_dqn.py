"""QR-DQN (Dabney et al. 2018): a distribution of returns per action, as N quantiles, learned with the quantile Huber loss.

What it changes, and all it changes: the network has a [B, n_actions, N] head (any policy with
`num_atoms: N`, e.g. `models.simple_policy.SimplePolicy`), actions maximise the mean of the
quantiles, and `loss` is the quantile regression loss. Acting, records, tables and the rest of
the update are DQN's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from models.simple_policy import SimplePolicy
from titan_rl.algorithm import Batch
from titan_rl.config import range_metadata
from titan_rl.errors import ConfigError
from trainers.dqn import DQN, DQNConfig, DQNLearner, LossOutput


@dataclass(frozen=True)
class QRDQNConfig(DQNConfig):
    """QR-DQN's section of the YAML: DQN's keys (`loss` is not used) plus the Huber threshold."""

    kappa: float = field(default=1.0, metadata=range_metadata(0, learner_only=True))
    """Quantile Huber loss threshold; 0 = the plain quantile (pinball) loss."""


class QRDQNLearner(DQNLearner):
    def loss(self, batch: Batch) -> LossOutput:
        obs, next_obs = batch["obs"], batch["next_obs"]
        action = batch["action"].long()
        quantiles = self.network(obs)  # [B, A, N]
        n = quantiles.shape[-1]
        with torch.no_grad():
            next_target = self.target(next_obs)  # [B, A, N]
            chooser = self.network(next_obs) if self.config.double_q else next_target
            next_action = chooser.mean(dim=2).argmax(dim=1)
            next_quantiles = next_target[torch.arange(len(next_action), device=self.device), next_action]  # [B, N]
            target = batch["reward"].float()[:, None] + self.bootstrap_discount(batch)[:, None] * next_quantiles
        chosen = quantiles[torch.arange(len(action), device=self.device), action]  # [B, N]
        u = target[:, None, :] - chosen[:, :, None]  # [B, N (predicted), N (target)]
        kappa = self.config.kappa
        if kappa > 0:  # Huber of each pairwise error, scaled so it meets |u| at kappa
            elementwise = torch.where(u.abs() <= kappa, 0.5 * u**2, kappa * (u.abs() - 0.5 * kappa)) / kappa
        else:
            elementwise = u.abs()
        taus = (torch.arange(n, dtype=u.dtype, device=self.device) + 0.5) / n  # quantile midpoints
        weight = (taus[None, :, None] - (u.detach() < 0).float()).abs()  # under- and over-estimates weigh tau and 1 - tau
        per_item = (weight * elementwise).mean(dim=2).sum(dim=1)
        td = (target.mean(dim=1) - chosen.mean(dim=1)).detach().abs()
        return LossOutput(per_item, td, {"losses/q_values": chosen.mean().item()})


class QRDQN(DQN):
    Config = QRDQNConfig
    learner_class = QRDQNLearner

    def q_values(self, network: nn.Module, obs: torch.Tensor) -> torch.Tensor:
        return network(obs).mean(dim=2)

    def check_network(self, network: nn.Module) -> None:
        with torch.no_grad():
            out = network(torch.as_tensor(np.zeros((2, *self.env.obs_shape), self.env.obs_dtype)))
        if out.ndim != 3 or out.shape[:2] != (2, self.env.n_actions):
            raise ConfigError(
                f"policy.path={self.cfg.policy.path!r}: QR-DQN needs outputs of shape [B, {self.env.n_actions}, quantiles] "
                f"(e.g. policy.kwargs.num_atoms: 32), got {tuple(out.shape)}"
            )
        super().check_network(network)

    def tiny_network(self) -> nn.Module:
        return SimplePolicy(math.prod(self.env.obs_shape), self.env.n_actions, [32], num_atoms=8)
