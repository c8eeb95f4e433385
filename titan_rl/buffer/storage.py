"""Preallocated row-major ring storage: one fixed-width byte record per item, of a fixed signature."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from titan_rl.errors import BadValueError, ShapeMismatchError
from titan_rl.records import RecordLayout


def keys_at(slots: np.ndarray, inserts_total: int, capacity: int) -> np.ndarray:
    """Keys of the items at `slots` of a ring of `capacity` after `inserts_total` inserts (the newest wins each slot)."""
    newest = inserts_total - 1
    return newest - (newest - slots) % capacity


class RingStorage:
    """Fixed-capacity ring of records; writes go to `next_slot` and wrap around.

    The signature (`spec`: each field's per-record shape and dtype) is fixed at construction,
    from the algorithm's record spec: a writer can neither change it nor add fields. Records
    are stored row-major, one row of all fields per item (see titan_rl.records), because
    sampling is a random gather: a row costs one or two cache misses where one array per
    field cost one per field. Item keys count inserts (the first item ever is key 0), and the
    item with key k lives at slot k % capacity. Not thread-safe on its own: a `Table`
    serialises access.
    """

    def __init__(self, capacity: int, spec: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not spec:
            raise ValueError("a storage needs at least one field")
        self.capacity = capacity
        self.layout = RecordLayout.for_spec({name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in spec.items()})
        self.size = 0
        self.inserts_total = 0
        self._records = np.zeros((capacity, self.layout.record_size), np.uint8)
        self._columns = {name: s.cells(self._records) for name, s in self.layout.slots.items() if s.nbytes}
        self._same_layout: RecordLayout | None = None

    @property
    def spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return self.layout.spec

    @property
    def next_slot(self) -> int:
        return self.inserts_total % self.capacity

    def check_spec(self, spec: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """Every declared field present with the stored shape and dtype, and no other field."""
        for name in spec:
            if name not in self.layout.slots:
                raise ShapeMismatchError(name, f"is not in the table's signature ({', '.join(self.layout.slots)})")
        for name, (shape, dtype) in self.spec.items():
            if name not in spec:
                raise ShapeMismatchError(name, "missing")
            got_shape, got_dtype = spec[name]
            if tuple(got_shape) != shape or np.dtype(got_dtype).newbyteorder("=") != dtype:
                raise ShapeMismatchError(
                    name, f"got rows of shape {tuple(got_shape)} {np.dtype(got_dtype)}, the table stores {shape} {dtype}"
                )

    def check_values(
        self, fields: Mapping[str, np.ndarray], bounds: Mapping[str, tuple[float, float]], non_finite: tuple[str, ...] = ()
    ) -> None:
        """Every float finite (but in the `non_finite` fields), every bool byte 0 or 1, every bounded field
        within [low, high]; else BadValueError naming the field.

        Runs on every insert, before anything is stored: one vectorised pass per field."""
        for name, values in fields.items():
            dtype = values.dtype
            if not values.size:
                continue
            if dtype.kind == "f" and name not in non_finite and not np.isfinite(values).all():
                row = np.argmin(np.isfinite(values).reshape(len(values), -1).all(axis=1))
                raise BadValueError(name, f"holds nan or inf at row {row}")
            if dtype.kind == "b" and values.view(np.uint8).max() > 1:
                raise BadValueError(name, "holds a bool byte other than 0 or 1")
            if name in bounds:
                (low, high), lowest, highest = bounds[name], values.min(), values.max()
                if lowest < low or highest > high:
                    raise BadValueError(name, f"holds values in [{lowest}, {highest}], outside [{low:g}, {high:g}]")

    def check_layout(self, layout: RecordLayout) -> None:
        """`check_spec` for records, skipped for a layout object already accepted (senders reuse one per stream)."""
        if layout is not self._same_layout:
            self.check_spec(layout.spec)

    def validate(self, fields: Mapping[str, np.ndarray]) -> int:
        """Check a batch of arrays against the signature; returns its row count."""
        rows = {name: a.shape[0] if a.ndim else -1 for name, a in fields.items()}
        first = next(iter(rows), None)
        for name, n in rows.items():
            if n != rows[first] or n < 0:
                raise ShapeMismatchError(name, f"has {n} rows but {first} has {rows[first]}")
        self.check_spec({name: (a.shape[1:], a.dtype) for name, a in fields.items()})
        return rows[first] if first is not None else 0

    def add(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        """Copy a batch of arrays in, field by field; returns the slots written."""
        n = self.validate(fields)
        slots, fields = self._slots_for(n), {name: a[-self.capacity :] for name, a in fields.items()}
        for name, column in self._columns.items():
            column[slots] = self.layout.slots[name].cells_of(fields[name])
        return self._advance(n, slots)

    def add_records(self, records: np.ndarray, layout: RecordLayout) -> np.ndarray:
        """Copy [n, layout.record_size] uint8 records in (checked with `check_layout`): whole rows when
        `layout` is the stored one (what `RecordLayout.for_fields` gives every sender), field by field
        otherwise. Returns the slots written."""
        if layout is not self._same_layout:
            if layout != self.layout:
                return self.add(layout.views(records))
            self._same_layout = layout  # senders reuse one layout object per stream: compare it once
        n = len(records)
        slots = self._slots_for(n)
        records = records[-self.capacity :]
        start = int(slots[0]) if len(slots) else 0
        first = min(len(records), self.capacity - start)
        self._records[start : start + first] = records[:first]
        self._records[: len(records) - first] = records[first:]
        return self._advance(n, slots)

    def _slots_for(self, n: int) -> np.ndarray:
        """Slots of the next min(n, capacity) items that survive an insert of n (only the newest fit)."""
        kept = min(n, self.capacity)
        return (self.inserts_total + n - kept + np.arange(kept)) % self.capacity

    def _advance(self, n: int, slots: np.ndarray) -> np.ndarray:
        self.inserts_total += n
        self.size = min(self.size + n, self.capacity)
        return slots

    def keys_of(self, slots: np.ndarray) -> np.ndarray:
        """The key of the item now held at each slot."""
        return keys_at(slots, self.inserts_total, self.capacity)

    def slots_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slots, mask of keys whose item is still stored): an item is overwritten `capacity` inserts after it came."""
        keys = np.asarray(keys, np.int64)
        live = (keys >= self.inserts_total - self.size) & (keys < self.inserts_total)
        return keys % self.capacity, live

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """A [len(slots), record_size] uint8 copy of the records at `slots`; `layout.views` reads its fields."""
        return np.take(self._records, slots, axis=0)

    def move(self, source: np.ndarray, destination: np.ndarray) -> None:
        """Copy the records at slots `source` to slots `destination` (a queue closing the gaps of dropped items)."""
        self._records[destination] = self._records[source]

    def signature(self) -> list[list[Any]]:
        """Each field's [name, dtype, shape, offset]: what a saved state must match to be read back."""
        return [[name, s.dtype.name, list(s.shape), s.offset] for name, s in self.layout.slots.items()]

    def state_dict(self) -> dict[str, Any]:
        """The filled rows, their signature and the insert count (plain numpy, lists and ints)."""
        return self._state(self._records[: self.size].copy(), np.zeros(0, np.int64))

    def live_records(self) -> np.ndarray:
        """The filled rows themselves, not a copy: inserts keep writing them. See `patched_state`."""
        return self._records[: self.size]

    def patched_state(self, records: np.ndarray, first_new_key: int) -> dict[str, Any]:
        """The state now, given `records`: the rows as read (possibly mid-insert) while items from
        `first_new_key` on were inserted. Only inserts write rows, so every row that may have changed
        since belongs to such an item; those rows are copied again now (call with the table's lock
        held) as a patch that loading applies over `records`."""
        new_items = self.inserts_total - first_new_key
        slots = np.arange(self.size) if new_items >= self.capacity else (first_new_key + np.arange(new_items)) % self.capacity
        return self._state(records, slots.astype(np.int64))

    def _state(self, records: np.ndarray, patch_slots: np.ndarray) -> dict[str, Any]:
        return {
            "records": records,
            "size": self.size,
            "patch_slots": patch_slots,
            "patch_records": self._records[patch_slots],
            "inserts_total": self.inserts_total,
            "capacity": self.capacity,
            "signature": self.signature(),
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ValueError, changing nothing, unless `state` is one of this storage's signature and capacity."""
        if state["signature"] != self.signature():
            raise ValueError(f"signature: the state holds {state['signature']}, this storage {self.signature()}")
        if state["capacity"] != self.capacity:  # item k lives at slot k % capacity: another capacity scrambles the ring
            raise ValueError(f"capacity: the state is of a storage of {state['capacity']} items, this one holds {self.capacity}")
        records = np.asarray(state["records"])
        if records.dtype != np.uint8 or records.ndim != 2 or records.shape[1] != self.layout.record_size:
            raise ValueError(f"records: {records.dtype} of shape {records.shape} are not {self.layout.record_size}-byte records")
        size, inserts_total = int(state["size"]), int(state["inserts_total"])
        if not len(records) <= size <= min(self.capacity, inserts_total):
            raise ValueError(f"size: {size} items with {len(records)} rows saved, capacity {self.capacity} and {inserts_total} inserts")
        slots, patch = np.asarray(state["patch_slots"]), np.asarray(state["patch_records"])
        if slots.dtype != np.int64 or slots.ndim != 1 or (len(slots) and not 0 <= slots.min() <= slots.max() < size):
            raise ValueError(f"patch_slots: {slots.dtype} of shape {slots.shape} are not slots below {size}")
        if patch.dtype != np.uint8 or patch.shape != (len(slots), self.layout.record_size):
            expected = (len(slots), self.layout.record_size)
            raise ValueError(f"patch_records: {patch.dtype} of shape {patch.shape}, expected uint8 of shape {expected}")
        if np.setdiff1d(np.arange(len(records), size), slots).size:
            raise ValueError(f"patch_slots: rows {len(records)}-{size - 1} were neither saved nor patched")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state)
        records = np.asarray(state["records"], np.uint8)
        self._records[: len(records)] = records
        self._records[np.asarray(state["patch_slots"])] = state["patch_records"]
        self.size, self.inserts_total = int(state["size"]), int(state["inserts_total"])
