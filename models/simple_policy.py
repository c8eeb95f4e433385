"""The default Q-network: a multilayer perceptron."""

from __future__ import annotations

import torch
from torch import nn


def relu_mlp(in_width: int, hidden_sizes: list[int] | tuple[int, ...]) -> tuple[list[nn.Module], int]:
    """Linear + ReLU layers of the given widths, and the width of their output."""
    layers: list[nn.Module] = []
    for hidden in hidden_sizes:
        layers += [nn.Linear(in_width, hidden), nn.ReLU()]
        in_width = hidden
    return layers, in_width


class SimplePolicy(nn.Module):
    """MLP from a flat observation of `state_dim` floats to `action_dim` Q-values.

    With `num_atoms > 1` (distributional heads, e.g. QR-DQN quantiles) the last layer has
    `action_dim * num_atoms` outputs, reshaped to `[B, action_dim, num_atoms]`.

    Example (YAML):
        policy:
          path: models.simple_policy.SimplePolicy
          kwargs: {state_dim: 4, action_dim: 2, hidden_sizes: [256, 256]}
    """

    def __init__(self, state_dim: int, action_dim: int, hidden_sizes: list[int] | tuple[int, ...] = (64, 64), num_atoms: int = 1):
        super().__init__()
        if num_atoms < 1:
            raise ValueError(f"num_atoms must be >= 1, got {num_atoms}")
        self.action_dim = action_dim
        self.num_atoms = num_atoms
        layers, width = relu_mlp(state_dim, hidden_sizes)
        layers.append(nn.Linear(width, action_dim * num_atoms))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.net(obs.flatten(start_dim=1).float())
        return out if self.num_atoms == 1 else out.view(out.shape[0], self.action_dim, self.num_atoms)
