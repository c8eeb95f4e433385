"""IMPALA (Espeholt et al. 2018): actors sample from the policy and send segments with their
behaviour log-probs through a FIFO table; the learner corrects for their lag with V-trace.

The network maps observations to `(logits [B, A], value [B])`, e.g. `models.actor_critic.ActorCriticMLP`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from models.actor_critic import ActorCriticMLP
from titan_rl.algorithm import Batch, Learner
from titan_rl.config import LEARNER_ONLY, range_metadata
from titan_rl.on_policy import OnPolicyAlgorithm, OnPolicyConfig
from trainers.vtrace import vtrace


@dataclass(frozen=True)
class IMPALAConfig(OnPolicyConfig):
    """IMPALA's section of the YAML (`algorithm.config`), on top of every on-policy algorithm's keys."""

    lr: float = field(default=1e-3, metadata=range_metadata(0, 10, learner_only=True))
    """Adam learning rate."""
    entropy_coef: float = field(default=0.01, metadata=range_metadata(0, learner_only=True))
    """Weight of the entropy bonus."""
    value_coef: float = field(default=0.5, metadata=range_metadata(0, learner_only=True))
    """Weight of the value loss."""
    max_grad_norm: float = field(default=40.0, metadata=range_metadata(0, learner_only=True))
    """Gradient-norm clip; 0 disables clipping."""
    rho_bar: float = field(default=1.0, metadata=range_metadata(0, learner_only=True))
    """V-trace: clip of the importance weights in the TD errors and the policy gradient."""
    c_bar: float = field(default=1.0, metadata=range_metadata(0, learner_only=True))
    """V-trace: clip of the trace-cutting coefficients."""
    normalize_advantages: bool = field(default=False, metadata=LEARNER_ONLY)
    """Scale each batch's policy-gradient advantages to zero mean and unit variance (as PPO implementations do)."""


class IMPALALearner(Learner):
    def __init__(self, network: nn.Module, config: IMPALAConfig):
        super().__init__(network)
        self.config = config
        self.optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)

    def _update(self, batch: Batch) -> dict[str, float]:
        c = self.config
        action = batch["action"].long()  # [B, T]
        b, t = action.shape
        logits, value = self.network(batch["obs"].flatten(0, 1))
        logits, value = logits.view(b, t, -1), value.view(b, t)
        with torch.no_grad():
            _, next_value = self.network(batch["next_obs"].flatten(0, 1))
        log_probs = torch.log_softmax(logits, dim=-1)
        target_log_prob = log_probs.gather(2, action.unsqueeze(2)).squeeze(2)
        targets = vtrace(
            batch["log_prob"].float(),
            target_log_prob.detach(),
            batch["reward"].float(),
            value.detach(),
            next_value.view(b, t),
            batch["terminated"].bool(),
            batch["truncated"].bool(),
            gamma=c.gamma,
            rho_bar=c.rho_bar,
            c_bar=c.c_bar,
        )
        advantage = targets.pg_advantage
        if c.normalize_advantages:
            advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
        policy_loss = -(advantage * target_log_prob).mean()
        value_loss = 0.5 * (targets.vs - value).pow(2).mean()
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1).mean()
        loss = policy_loss + c.value_coef * value_loss - c.entropy_coef * entropy

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), c.max_grad_norm) if c.max_grad_norm > 0 else torch.tensor(0.0)
        self.optimizer.step()
        return {
            "losses/loss": loss.item(),
            "losses/policy_loss": policy_loss.item(),
            "losses/value_loss": value_loss.item(),
            "losses/entropy": entropy.item(),
            "losses/mean_rho": targets.rho.mean().item(),
            "losses/grad_norm": float(grad_norm),
        }


class IMPALA(OnPolicyAlgorithm):
    """Sampling actors, segments in a FIFO table, an actor-critic learner with V-trace."""

    Config = IMPALAConfig

    def make_learner(self, network: nn.Module) -> IMPALALearner:
        return IMPALALearner(network, self.config)

    def tiny_network(self) -> nn.Module:
        return ActorCriticMLP(math.prod(self.env.obs_shape), self.env.n_actions, [32])
