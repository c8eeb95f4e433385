"""Preallocated row-major ring storage: one fixed-width byte record per transition."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from titan_rl.errors import ShapeMismatchError
from titan_rl.records import RecordLayout
from titan_rl.wire import TRANSITION_FIELDS


class RingStorage:
    """Fixed-capacity FIFO of transitions; the oldest rows are overwritten first.

    Rows are stored row-major, one record of all fields per transition (see titan_rl.records),
    because sampling is a random gather: a record costs one or two cache misses where one array
    per field cost one per field, and `np.take` copies whole records (4x faster for CartPole at
    1M rows). The first `add` fixes each field's per-row shape and dtype and the record layout;
    every later batch is checked against them. Not thread-safe on its own: `ReplayBuffer`
    serialises access.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.size = 0
        self.inserts_total = 0
        self._next = 0
        self.layout: RecordLayout | None = None  # set by the first add
        self._records = np.empty((0, 0), np.uint8)
        self._columns: dict[str, np.ndarray] = {}  # per field: its cells of _records (FieldSlot.cells)
        self._same_layout: RecordLayout | None = None

    @property
    def spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return self.layout.spec if self.layout else {}

    def check_spec(self, spec: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """Check per-row (shape, dtype) of every field against the stored spec (or against itself before the first add)."""
        missing = [name for name in TRANSITION_FIELDS if name not in spec]
        if missing:
            raise ShapeMismatchError(missing[0], "missing")
        if spec["obs"][0] != spec["next_obs"][0]:
            raise ShapeMismatchError("next_obs", f"rows of shape {spec['next_obs'][0]} != obs rows of shape {spec['obs'][0]}")
        for name in ("terminated", "truncated"):
            if spec[name][1] != np.bool_:
                raise ShapeMismatchError(name, f"dtype {spec[name][1]} must be bool")
        for name in ("action", "reward", "terminated", "truncated"):
            if spec[name][0] != ():
                raise ShapeMismatchError(name, f"rows of shape {spec[name][0]} must be scalars")
        for name, (shape, dtype) in self.spec.items():
            got_shape, got_dtype = spec[name]
            if got_shape != shape or got_dtype.newbyteorder("=") != dtype:
                raise ShapeMismatchError(name, f"got rows of shape {got_shape} {got_dtype}, the buffer stores {shape} {dtype}")

    def check_layout(self, layout: RecordLayout) -> None:
        """`check_spec` for records, skipped for the stored layout's twin already seen (senders reuse one per stream)."""
        if layout is not self._same_layout:
            self.check_spec(layout.spec)

    def validate(self, fields: Mapping[str, np.ndarray]) -> int:
        """Check a batch of arrays against the stored spec (see `check_spec`); returns its row count."""
        missing = [name for name in TRANSITION_FIELDS if name not in fields]
        if missing:
            raise ShapeMismatchError(missing[0], "missing")
        rows = {name: fields[name].shape[0] if fields[name].ndim else -1 for name in TRANSITION_FIELDS}
        n = rows["obs"]
        for name in TRANSITION_FIELDS:
            if rows[name] != n or n < 0:
                raise ShapeMismatchError(name, f"has {rows[name]} rows but obs has {n}")
        self.check_spec({name: (fields[name].shape[1:], fields[name].dtype) for name in TRANSITION_FIELDS})
        return n

    def _init(self, spec: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        self.layout = RecordLayout.for_spec({name: spec[name] for name in TRANSITION_FIELDS})
        self._records = np.zeros((self.capacity, self.layout.record_size), np.uint8)
        self._columns = {name: s.cells(self._records) for name, s in self.layout.slots.items() if s.nbytes}

    def add(self, fields: Mapping[str, np.ndarray]) -> int:
        """Copy a batch of arrays in, field by field; returns the number of rows written."""
        n = self.validate(fields)
        if self.layout is None:
            self._init({name: (fields[name].shape[1:], fields[name].dtype) for name in TRANSITION_FIELDS})
        if n > self.capacity:  # only the newest `capacity` rows survive anyway
            fields = {name: a[-self.capacity :] for name, a in fields.items()}
            self.inserts_total += n - self.capacity
            n = self.capacity
        start = self._next
        first = min(n, self.capacity - start)
        for name, column in self._columns.items():
            src = self.layout.slots[name].cells_of(fields[name])
            column[start : start + first] = src[:first]
            if first < n:
                column[: n - first] = src[first:]
        return self._advance(n)

    def add_records(self, records: np.ndarray, layout: RecordLayout) -> int:
        """Copy [n, layout.record_size] uint8 records in: whole rows when `layout` is the stored
        one (what `RecordLayout.for_fields` gives every sender), field by field otherwise."""
        if layout is not self._same_layout:
            if layout != self.layout:
                return self.add(layout.views(records))
            self._same_layout = layout  # senders reuse one layout object per stream: compare it once
        n = len(records)
        if n > self.capacity:
            self.inserts_total += n - self.capacity
            records, n = records[-self.capacity :], self.capacity
        start = self._next
        first = min(n, self.capacity - start)
        self._records[start : start + first] = records[:first]
        self._records[: n - first] = records[first:]
        return self._advance(n)

    def _advance(self, n: int) -> int:
        self._next = (self._next + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self.inserts_total += n
        return n

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """A [len(indices), record_size] uint8 copy of the records at `indices`; `layout.views` reads its fields."""
        return np.take(self._records, indices, axis=0)
