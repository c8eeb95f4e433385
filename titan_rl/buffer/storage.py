"""Preallocated numpy ring storage, one array per transition field."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from titan_rl.errors import ShapeMismatchError
from titan_rl.wire import TRANSITION_FIELDS


class RingStorage:
    """Fixed-capacity FIFO of transitions; the oldest rows are overwritten first.

    The first `add` fixes each field's per-row shape and dtype and allocates
    `capacity` rows of each; every later batch is checked against them. Not
    thread-safe on its own: `ReplayBuffer` serialises access.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.size = 0
        self.inserts_total = 0
        self._next = 0
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {name: (a.shape[1:], a.dtype) for name, a in self._arrays.items()}

    def validate(self, fields: Mapping[str, np.ndarray]) -> int:
        """Check a batch against the stored spec (or against itself before the first add); returns its row count."""
        missing = [name for name in TRANSITION_FIELDS if name not in fields]
        if missing:
            raise ShapeMismatchError(missing[0], "missing")
        rows = {name: fields[name].shape[0] if fields[name].ndim else -1 for name in TRANSITION_FIELDS}
        n = rows["obs"]
        for name in TRANSITION_FIELDS:
            if rows[name] != n or n < 0:
                raise ShapeMismatchError(name, f"has {rows[name]} rows but obs has {n}")
        if fields["obs"].shape != fields["next_obs"].shape:
            raise ShapeMismatchError("next_obs", f"shape {fields['next_obs'].shape} != obs shape {fields['obs'].shape}")
        for name in ("terminated", "truncated"):
            if fields[name].dtype != np.bool_:
                raise ShapeMismatchError(name, f"dtype {fields[name].dtype} must be bool")
        for name in ("action", "reward", "terminated", "truncated"):
            if fields[name].ndim != 1:
                raise ShapeMismatchError(name, f"shape {fields[name].shape} must be [N]")
        for name, (shape, dtype) in self.spec.items():
            got = fields[name]
            if got.shape[1:] != shape or got.dtype != dtype:
                raise ShapeMismatchError(name, f"got rows of shape {got.shape[1:]} {got.dtype}, the buffer stores {shape} {dtype}")
        return n

    def add(self, fields: Mapping[str, np.ndarray]) -> int:
        """Copy a validated batch in; returns the number of rows written."""
        n = self.validate(fields)
        if not self._arrays:
            self._arrays = {
                name: np.zeros((self.capacity, *fields[name].shape[1:]), dtype=fields[name].dtype) for name in TRANSITION_FIELDS
            }
        if n > self.capacity:  # only the newest `capacity` rows survive anyway
            fields = {name: a[-self.capacity :] for name, a in fields.items()}
            self.inserts_total += n - self.capacity
            n = self.capacity
        first = min(n, self.capacity - self._next)
        for name in TRANSITION_FIELDS:
            src, dst = fields[name], self._arrays[name]
            dst[self._next : self._next + first] = src[:first]
            dst[: n - first] = src[first:]
        self._next = (self._next + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self.inserts_total += n
        return n

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Copies of the rows at `indices` (fancy indexing always copies)."""
        return {name: a[indices] for name, a in self._arrays.items()}
