"""Fixed-width records: every field of one transition packed side by side in one row of bytes.

The replay buffer stores transitions this way (a random gather then touches one or two cache
lines per row instead of one per field) and sampled batches travel this way (one bytes payload
per message instead of one per field). A `RecordLayout` says where each field sits in a row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FieldSlot:
    """Where one field lives inside a record."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    nbytes: int
    cell: np.dtype  # V<nbytes>: the field's bytes in one row as one opaque item

    def cells(self, rows: np.ndarray) -> np.ndarray:
        """This field of [n, record_size] uint8 `rows` as n opaque `V<nbytes>` items: numpy copies
        those one item at a time, ~7x faster than the same bytes as [n, 2] uint64 (4,096 CartPole
        observations: 2.8 us instead of 19.5 us)."""
        return rows[:, self.offset : self.offset + self.nbytes].view(self.cell).reshape(len(rows))

    def cells_of(self, values: np.ndarray) -> np.ndarray:
        """[n, *shape] `values` (any byte order) as n `V<nbytes>` items in this slot's dtype."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        return values.reshape(len(values), self.nbytes // self.dtype.itemsize).view(self.cell).reshape(len(values))


@dataclass(frozen=True)
class RecordLayout:
    """Where every field sits in a record of `record_size` bytes; equal layouts copy rows whole."""

    slots: dict[str, FieldSlot]
    record_size: int

    @classmethod
    def for_spec(cls, spec: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> RecordLayout:
        """Layout for rows whose fields have these per-row (shape, dtype): widest items first, so
        every field sits on its natural alignment; the record is padded to the widest item."""
        order = sorted(spec, key=lambda name: -spec[name][1].itemsize)
        spans, offset = {}, 0
        for name in order:
            shape, dtype = spec[name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            spans[name] = (tuple(shape), dtype.newbyteorder("="), offset, nbytes)
            offset += nbytes
        widest = max((dtype.itemsize for _, dtype in spec.values()), default=1)
        record_size = max(-(-offset // widest) * widest, 1)
        return cls.from_spans({name: spans[name] for name in spec}, record_size)

    @classmethod
    def for_fields(cls, fields: Mapping[str, np.ndarray]) -> RecordLayout:
        """`for_spec` of arrays with a leading row axis."""
        return cls.for_spec({name: (a.shape[1:], a.dtype) for name, a in fields.items()})

    @classmethod
    def from_spans(cls, spans: Mapping[str, tuple[tuple[int, ...], np.dtype, int, int]], record_size: int) -> RecordLayout:
        """From (shape, dtype, offset, nbytes) per field, as read off the wire; the caller checks bounds."""
        slots = {
            name: FieldSlot(shape, dtype, offset, nbytes, np.dtype((np.void, nbytes)))
            for name, (shape, dtype, offset, nbytes) in spans.items()
        }
        return cls(slots, record_size)

    def write(self, records: np.ndarray, fields: Mapping[str, np.ndarray]) -> None:
        """Copy `fields` (already checked against this layout) into `records`, a [n, record_size] uint8 array."""
        for name, slot in self.slots.items():
            if slot.nbytes:
                slot.cells(records)[:] = slot.cells_of(fields[name])

    def pack(self, fields: Mapping[str, np.ndarray], rows: int) -> np.ndarray:
        """`fields` ([rows, ...] each, checked against this layout) as a new [rows, record_size] uint8 array, padding zeroed."""
        records = np.zeros((rows, self.record_size), np.uint8)
        self.write(records, fields)
        return records

    @property
    def spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row (shape, dtype) of every field."""
        return {name: (slot.shape, slot.dtype) for name, slot in self.slots.items()}

    def views(self, records: np.ndarray) -> dict[str, np.ndarray]:
        """Every field of `records` ([n, record_size] uint8) as a strided view, no copy."""
        n = len(records)
        out = {}
        for name, slot in self.slots.items():
            if slot.nbytes == 0:
                out[name] = np.zeros((n, *slot.shape), slot.dtype)
            else:
                out[name] = records[:, slot.offset : slot.offset + slot.nbytes].view(slot.dtype).reshape(n, *slot.shape)
        return out
