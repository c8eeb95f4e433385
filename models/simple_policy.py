"""The default Q-network: a multilayer perceptron."""

from __future__ import annotations

import torch
from torch import nn


class SimplePolicy(nn.Module):
    """MLP from a flat observation of `state_dim` floats to `action_dim` Q-values.

    Example (YAML):
        policy:
          path: models.simple_policy.SimplePolicy
          kwargs: {state_dim: 4, action_dim: 2, hidden_sizes: [256, 256]}
    """

    def __init__(self, state_dim: int, action_dim: int, hidden_sizes: list[int] | tuple[int, ...] = (64, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        width = state_dim
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, action_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.flatten(start_dim=1).float())
