"""An actor-critic network: a shared MLP torso with a policy (logits) head and a state-value head."""

from __future__ import annotations

import math

import torch
from torch import nn


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCriticMLP(nn.Module):
    """MLP from a flat observation of `state_dim` floats to (`action_dim` logits, one state value).

    Tanh torso shared by both heads; orthogonal init as in CleanRL's PPO (gain sqrt(2) for the
    torso, 0.01 for the policy head so the initial policy is near uniform, 1.0 for the value head),
    biases zero. `forward` returns `(logits [B, action_dim], value [B])`.

    Example (YAML):
        policy:
          path: models.actor_critic.ActorCriticMLP
          kwargs: {state_dim: 4, action_dim: 2, hidden_sizes: [64, 64]}
    """

    def __init__(self, state_dim: int, action_dim: int, hidden_sizes: list[int] | tuple[int, ...] = (64, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        width = state_dim
        for hidden in hidden_sizes:
            layers += [_orthogonal(nn.Linear(width, hidden), math.sqrt(2)), nn.Tanh()]
            width = hidden
        self.torso = nn.Sequential(*layers)
        self.policy_head = _orthogonal(nn.Linear(width, action_dim), 0.01)
        self.value_head = _orthogonal(nn.Linear(width, 1), 1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.torso(obs.flatten(start_dim=1).float())
        return self.policy_head(features), self.value_head(features).squeeze(-1)
