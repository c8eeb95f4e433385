"""The dueling Q-network (Wang et al. 2016): Q(s, a) = V(s) + A(s, a) - mean_a' A(s, a')."""

from __future__ import annotations

import torch
from torch import nn

from models.simple_policy import relu_mlp


class DuelingMLP(nn.Module):
    """MLP torso from a flat observation of `state_dim` floats, then a value stream and an advantage stream.

    Returns Q-values `[B, action_dim]` when `num_atoms == 1`, else `[B, action_dim, num_atoms]` for
    distributional heads (e.g. QR-DQN quantiles); the advantage mean over actions is subtracted per atom.

    Example (YAML):
        policy:
          path: models.dueling.DuelingMLP
          kwargs: {state_dim: 4, action_dim: 2, hidden_sizes: [256, 256]}
    """

    def __init__(self, state_dim: int, action_dim: int, hidden_sizes: list[int] | tuple[int, ...] = (64, 64), num_atoms: int = 1):
        super().__init__()
        if num_atoms < 1:
            raise ValueError(f"num_atoms must be >= 1, got {num_atoms}")
        self.action_dim = action_dim
        self.num_atoms = num_atoms
        layers, width = relu_mlp(state_dim, hidden_sizes)
        self.torso = nn.Sequential(*layers)
        self.value_stream = nn.Linear(width, num_atoms)
        self.advantage_stream = nn.Linear(width, action_dim * num_atoms)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        features = self.torso(obs.flatten(start_dim=1).float())
        batch = features.shape[0]
        value = self.value_stream(features).view(batch, 1, self.num_atoms)
        advantage = self.advantage_stream(features).view(batch, self.action_dim, self.num_atoms)
        q = value + advantage - advantage.mean(dim=1, keepdim=True)
        return q.squeeze(-1) if self.num_atoms == 1 else q
