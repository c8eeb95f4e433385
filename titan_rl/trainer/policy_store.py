"""The latest published weights, encoded once and shared by every subscriber."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from titan_rl import wire
from titan_rl.v1 import common_pb2


class PolicyStore:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest: common_pb2.PolicyWeights | None = None
        self._closed = False

    @property
    def version(self) -> int:
        with self._cond:
            return self._latest.version if self._latest is not None else -1

    def publish(self, state: Mapping[str, torch.Tensor], env_steps: int = 0) -> int:
        """Encode `state` as the next version and wake every watcher; returns the version.

        `env_steps` (buffer-wide) travels with the weights: actors run their schedules on it."""
        with self._cond:
            version = self._latest.version + 1 if self._latest is not None else 0
        weights = wire.encode_weights({k: t.detach().cpu().numpy() for k, t in state.items()}, version, env_steps)  # outside the lock
        with self._cond:
            self._latest = weights
            self._cond.notify_all()
        return version

    def latest(self) -> common_pb2.PolicyWeights | None:
        with self._cond:
            return self._latest

    def wait_newer(self, after_version: int, timeout_s: float) -> common_pb2.PolicyWeights | None:
        """Weights newer than `after_version`, or None on timeout or close."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or (self._latest is not None and self._latest.version > after_version), timeout_s)
            if self._latest is not None and self._latest.version > after_version:
                return self._latest
            return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
