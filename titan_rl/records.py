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
    """Where one field lives inside a record, and the widest unsigned int that copies it whole."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    nbytes: int
    word: np.dtype


def _word(offset: int, nbytes: int, record_size: int) -> np.dtype:
    size = next(s for s in (8, 4, 2, 1) if offset % s == 0 and nbytes % s == 0 and record_size % s == 0)
    return np.dtype(f"<u{size}")


@dataclass(frozen=True)
class RecordLayout:
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
            name: FieldSlot(shape, dtype, offset, nbytes, _word(offset, nbytes, record_size))
            for name, (shape, dtype, offset, nbytes) in spans.items()
        }
        return cls(slots, record_size)

    def write(self, records: np.ndarray, fields: Mapping[str, np.ndarray]) -> None:
        """Copy `fields` (already checked against this layout) into `records`, a [n, record_size] uint8 array."""
        n = len(records)
        for name, slot in self.slots.items():
            src = np.ascontiguousarray(fields[name], dtype=slot.dtype).view(slot.word).reshape(n, slot.nbytes // slot.word.itemsize)
            records[:, slot.offset : slot.offset + slot.nbytes].view(slot.word)[:] = src

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
