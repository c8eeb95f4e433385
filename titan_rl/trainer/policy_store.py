"""The latest published weights, encoded once and shared by every subscriber."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Mapping

import torch

from titan_rl import wire
from titan_rl.v1 import common_pb2


class PolicyStore:
    """Versions count up from `first_version` (a resumed run continues its count) within this
    store's random `epoch`: a subscriber that saw another epoch takes the latest weights at once."""

    def __init__(self, first_version: int = 0) -> None:
        self.epoch = secrets.randbits(63)
        self.finished = False
        self._first_version = first_version
        self._cond = threading.Condition()
        self._latest: common_pb2.PolicyWeights | None = None
        self._closed = False

    @property
    def version(self) -> int:
        with self._cond:
            return self._latest.version if self._latest is not None else self._first_version - 1

    def publish(self, state: Mapping[str, torch.Tensor], env_steps: int = 0) -> int:
        """Encode `state` as the next version and wake every watcher; returns the version.

        `env_steps` (buffer-wide) travels with the weights: actors run their schedules on it."""
        with self._cond:
            version = self._latest.version + 1 if self._latest is not None else self._first_version
        arrays = {k: t.detach().cpu().numpy() for k, t in state.items()}
        weights = wire.encode_weights(arrays, version, env_steps, self.epoch)  # outside the lock
        with self._cond:
            self._latest = weights
            self._cond.notify_all()
        return version

    def latest(self) -> common_pb2.PolicyWeights | None:
        with self._cond:
            return self._latest

    def wait_newer(self, after_version: int, timeout_s: float, epoch: int | None = None) -> common_pb2.PolicyWeights | None:
        """Weights newer than `after_version` of `epoch` (another epoch's: the latest), or None on timeout, close or finish."""
        if epoch is not None and epoch != self.epoch:
            after_version = -(2**63)

        def newer() -> bool:
            return self._latest is not None and self._latest.version > after_version

        with self._cond:
            self._cond.wait_for(lambda: self._closed or self.finished or newer(), timeout_s)
            return self._latest if newer() else None

    def finish(self) -> None:
        """Training has ended: watchers get the latest weights they lack, then the end of the run."""
        with self._cond:
            self.finished = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
