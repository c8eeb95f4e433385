"""The MinAtar DQN network (Young & Tian 2019): one 3x3 convolution, then a hidden layer."""

from __future__ import annotations

import torch
from torch import nn


class MinAtarCNN(nn.Module):
    """Q-values from a MinAtar observation: `[B, 10, 10, in_channels]` booleans, channels last.

    Conv(16, 3x3, stride 1) + ReLU, then Linear(128) + ReLU and one output per action: the
    network of the MinAtar paper's DQN baseline.

    Example (YAML):
        policy:
          path: models.minatar_cnn.MinAtarCNN
          kwargs: {in_channels: 4, action_dim: 3}
    """

    def __init__(self, in_channels: int, action_dim: int, grid_size: int = 10, channels: int = 16, hidden_size: int = 128):
        super().__init__()
        self.action_dim = action_dim
        side = grid_size - 2  # a 3x3 convolution without padding
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, action_dim),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float().permute(0, 3, 1, 2))
