"""The contract between the trainer service and a learning algorithm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from titan_rl.config import TrainConfig


class Trainer:
    """An algorithm that improves `policy` from replayed batches.

    The service owns the loop (sampling, publishing weights, evaluation, checkpoints);
    a subclass fills `_update`. `update` converts the batch and counts updates, then
    calls `_update`. Everything `state_dict` returns must be tensors, numbers, strings
    and containers of them, so checkpoints load with `torch.load(weights_only=True)`.

    Example (a subclass in trainers/my_algo.py, chosen with `trainer.path: trainers.my_algo.MyTrainer`):
        class MyTrainer(Trainer):
            def _update(self, batch):
                loss = ...
                return {"losses/my_loss": loss.item()}
    """

    def __init__(self, policy: nn.Module, train: TrainConfig, **kwargs: Any):
        if kwargs:
            raise TypeError(f"unexpected trainer.kwargs: {', '.join(kwargs)}")
        self.policy = policy
        self.train = train
        self.updates = 0

    def update(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        """One learning step on a batch of transitions (see titan_rl.wire.TRANSITION_FIELDS)."""
        # np.array copies: batches decoded from the wire are read-only views
        metrics = self._update({name: torch.from_numpy(np.array(a)) for name, a in batch.items()})
        self.updates += 1
        return metrics

    def _update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.updates = int(state["updates"])
