"""Thread-safe replay buffer: ring storage + uniform sampling + optional rate limiting."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from titan_rl.buffer.rate_limiter import RateLimiter
from titan_rl.buffer.storage import RingStorage
from titan_rl.errors import NotEnoughDataError, SampleTooLargeError
from titan_rl.records import RecordLayout


@dataclass
class BufferInfo:
    size: int
    capacity: int
    inserts_total: int
    sampled_rows_total: int
    sample_calls_total: int


@dataclass
class SampledRows:
    """Rows drawn by `ReplayBuffer.sample`, as the records they are stored in."""

    records: np.ndarray  # [rows, layout.record_size] uint8, a copy
    layout: RecordLayout
    indices: np.ndarray  # [rows] int64 ring positions
    inserts_total: int  # env steps stored when these were drawn

    def fields(self) -> dict[str, np.ndarray]:
        """Every transition field as a strided view into `records`."""
        return self.layout.views(self.records)


class Closed(Exception):
    """The buffer was closed while a caller waited on the rate limiter."""


class ReplayBuffer:
    """One lock guards the storage; it is held only while rows are copied in or out.

    Example:
        >>> buf = ReplayBuffer(capacity=1000)
        >>> buf.add(fields)  # dict of equal-length arrays, see titan_rl.wire.TRANSITION_FIELDS
        >>> batch = buf.sample(batch_size=64).fields()
    """

    def __init__(
        self, capacity: int, rate_limiter: RateLimiter | None = None, seed: int | None = None, max_sample_bytes: int | None = None
    ):
        self._storage = RingStorage(capacity)
        self._limiter = rate_limiter
        self._cond = threading.Condition()
        self._rng = np.random.default_rng(seed)
        self._sampled_rows = 0
        self._sample_calls = 0
        self._closed = False
        self._max_sample_bytes = max_sample_bytes

    def add(self, fields: Mapping[str, np.ndarray], should_wait: Callable[[], bool] = lambda: True) -> int:
        """Insert rows, first waiting while the rate limiter says collection is too far ahead.

        `should_wait` is polled while waiting; returning False (the caller went away) or a
        `close()` raises `Closed`. A batch that fails validation raises ShapeMismatchError
        and stores nothing.
        """
        self._storage.validate(fields)
        with self._cond:
            if self._limiter is not None:
                self._wait(lambda: self._limiter.can_insert(self._storage.inserts_total, self._sampled_rows), should_wait)
            n = self._storage.add(fields)
            self._cond.notify_all()
        return n

    def add_records(self, records: np.ndarray, layout: RecordLayout, should_wait: Callable[[], bool] = lambda: True) -> int:
        """`add` for rows packed as [n, layout.record_size] uint8 records (as they arrive on the wire)."""
        self._storage.check_layout(layout)
        with self._cond:
            if self._limiter is not None:
                self._wait(lambda: self._limiter.can_insert(self._storage.inserts_total, self._sampled_rows), should_wait)
            n = self._storage.add_records(records, layout)
            self._cond.notify_all()
        return n

    def sample(
        self, batch_size: int, num_batches: int = 1, block: bool = False, should_wait: Callable[[], bool] = lambda: True
    ) -> SampledRows:
        """Draw `num_batches * batch_size` rows uniformly with replacement.

        With `block`, waits for the rate limiter (and for min size); without it, raises
        NotEnoughDataError when fewer than `batch_size` rows are stored. Rows that would take more
        than `max_sample_bytes` raise SampleTooLargeError (before anything is allocated).
        """
        rows = batch_size * num_batches
        with self._cond:
            if block and self._limiter is not None:
                self._wait(lambda: self._limiter.can_sample(self._storage.inserts_total, self._sampled_rows), should_wait)
            elif block:
                self._wait(lambda: self._storage.size >= batch_size, should_wait)
            size = self._storage.size
            if size < batch_size:
                raise NotEnoughDataError(f"the buffer holds {size} transitions, fewer than batch_size={batch_size}")
            record_size = self._storage.layout.record_size + 8  # a record and its int64 index
            if self._max_sample_bytes is not None and rows * record_size > self._max_sample_bytes:
                raise SampleTooLargeError(
                    f"batch_size * num_batches = {rows} rows of {record_size} bytes is over the {self._max_sample_bytes}-byte limit"
                )
            indices = self._rng.integers(0, size, rows)
            records = self._storage.gather(indices)
            self._sampled_rows += rows
            self._sample_calls += 1
            sampled = SampledRows(records, self._storage.layout, indices, self._storage.inserts_total)
            self._cond.notify_all()
        return sampled

    def _wait(self, ready: Callable[[], bool], should_wait: Callable[[], bool]) -> None:
        while not ready():
            if self._closed or not should_wait():
                raise Closed("replay buffer closed while waiting on the rate limiter")
            self._cond.wait(timeout=0.1)

    def info(self) -> BufferInfo:
        with self._cond:
            return BufferInfo(
                size=self._storage.size,
                capacity=self._storage.capacity,
                inserts_total=self._storage.inserts_total,
                sampled_rows_total=self._sampled_rows,
                sample_calls_total=self._sample_calls,
            )

    def close(self) -> None:
        """Wake every waiter with `Closed`; used at shutdown."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
