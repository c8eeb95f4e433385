"""A table: ring storage + how it is sampled (uniform, prioritized or FIFO) + a rate limiter, behind one lock.

Reverb's tables are the model: a replay table samples with replacement and keeps a
sample-to-insert ratio; a queue hands out each item once, oldest first. The lock is held only
while rows are copied in or out and while waiters are checked.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from titan_rl.algorithm import RecordSpec, TableSpec
from titan_rl.buffer.rate_limiter import RateLimiter
from titan_rl.buffer.samplers import PrioritizedSampler, Sampler, UniformSampler
from titan_rl.buffer.storage import RingStorage, keys_at
from titan_rl.errors import NotEnoughDataError, SampleTooLargeError
from titan_rl.records import RecordLayout

MAX_COUNT = 2**63 - 1  # counters travel as int64
COUNTERS = ("read_key", "env_steps_total", "sampled_rows_total", "sample_calls_total", "dropped_stale_total")
"""The counters of a table's state (`_state`), in the order `load_state_dict` assigns them."""
MAX_SENDERS_REMEMBERED = 65_536  # chunk senders whose last sequence number a table keeps (one per worker start)


@dataclass
class TableInfo:
    kind: str
    size: int
    capacity: int
    inserts_total: int
    env_steps_total: int
    sampled_rows_total: int
    sample_calls_total: int
    dropped_stale_total: int


@dataclass
class SampledRows:
    """Rows drawn by `Table.sample`, as the records they are stored in."""

    records: np.ndarray  # [rows, layout.record_size] uint8, a copy
    layout: RecordLayout
    slots: np.ndarray  # [rows] ring positions drawn
    weights: np.ndarray | None  # [rows] float32 importance weights (prioritized tables)
    inserts_total: int  # items stored when these were drawn
    env_steps_total: int
    capacity: int

    @functools.cached_property
    def keys(self) -> np.ndarray:
        """[rows] int64 item keys, worked out only when asked for: only UpdatePriorities needs them."""
        return keys_at(self.slots, self.inserts_total, self.capacity)

    def fields(self) -> dict[str, np.ndarray]:
        """Every field as a strided view into `records`."""
        return self.layout.views(self.records)


class Closed(Exception):
    """The table was closed while a caller waited on it."""


class Table:
    """One named table of the buffer.

    Example:
        >>> table = Table(TableSpec("uniform", capacity_items=1000), {"x": ((2,), np.dtype(np.float32))})
        >>> table.insert_fields({"x": np.zeros((10, 2), np.float32)})
        >>> batch = table.sample(batch_size=4).fields()
    """

    def __init__(self, spec: TableSpec, signature: RecordSpec, seed: int | None = None, max_sample_bytes: int | None = None):
        self.spec = spec
        self.storage = RingStorage(spec.capacity_items, signature)
        self._fifo = spec.kind == "fifo"
        self.sampler = self._make_sampler()
        self._limiter = None if self._fifo else RateLimiter(spec.samples_per_insert, max(spec.min_size_to_sample, 1), spec.slack_items)
        self._versions = np.full(spec.capacity_items, -1, np.int64)  # policy version that acted each item (FIFO lag bound)
        self._read_key = 0  # FIFO: key of the oldest item not yet handed out
        self._cond = threading.Condition()
        self._rng = np.random.default_rng(seed)
        self._max_sample_bytes = max_sample_bytes
        self.env_steps_total = 0
        self._sampled_rows = 0
        self._sample_calls = 0
        self._dropped_stale = 0
        self._last_sequence: dict[int, int] = {}  # sender id -> number of its last chunk stored
        self._closed = False

    def _make_sampler(self) -> Sampler:
        s = self.spec
        if s.kind == "prioritized":
            return PrioritizedSampler(s.capacity_items, alpha=s.priority_exponent, beta=s.importance_exponent_start)
        return UniformSampler()

    @property
    def layout(self) -> RecordLayout:
        return self.storage.layout

    def _unread(self) -> int:
        return self.storage.inserts_total - self._read_key

    def _room(self) -> int:
        """Records an insert may write now: a queue never overwrites unread items; a replay table
        writes all at once when its rate limiter allows, and may overshoot by that one call."""
        if self._fifo:
            return self.storage.capacity - self._unread()
        return self.storage.capacity if self._limiter.can_insert(self.storage.inserts_total, self._sampled_rows) else 0

    def insert_records(
        self,
        records: np.ndarray,
        layout: RecordLayout,
        env_steps: int,
        policy_version: int = -1,
        should_wait: Callable[[], bool] = lambda: True,
        origin: tuple[int, int] | None = None,
    ) -> int:
        """Store [n, record_size] records once the rate limiter allows; returns n, or 0 for a repeat.

        `should_wait` is polled while waiting; returning False (the caller went away) or a
        `close()` raises `Closed`. Records that do not fit the signature raise
        ShapeMismatchError, and `env_steps` that would carry the count past MAX_COUNT OverflowError;
        either stores nothing. `origin` (sender id, sequence number): a chunk whose number is not
        above the last one stored from that sender was stored before, and is skipped (a sender
        resends what was in flight when its stream broke).
        """
        self.storage.check_layout(layout)
        self.storage.check_values(layout.views(records), self.spec.value_bounds, self.spec.non_finite_fields)
        return self._insert(
            len(records), lambda a, b: self.storage.add_records(records[a:b], layout), env_steps, policy_version, should_wait, origin
        )

    def insert_fields(
        self,
        fields: Mapping[str, np.ndarray],
        env_steps: int | None = None,
        policy_version: int = -1,
        should_wait: Callable[[], bool] = lambda: True,
    ) -> int:
        """`insert_records` for a dict of equal-length arrays; `env_steps` defaults to the row count."""
        n = self.storage.validate(fields)
        self.storage.check_values(fields, self.spec.value_bounds, self.spec.non_finite_fields)

        def write(start: int, stop: int) -> np.ndarray:
            return self.storage.add({name: x[start:stop] for name, x in fields.items()})

        return self._insert(n, write, n if env_steps is None else env_steps, policy_version, should_wait)

    def _insert(
        self,
        n: int,
        write: Callable[[int, int], np.ndarray],
        env_steps: int,
        policy_version: int,
        should_wait: Callable[[], bool],
        origin: tuple[int, int] | None = None,
    ) -> int:
        """Write rows [0, n) in as few pieces as the table's room allows.

        A queue takes a chunk larger than its free room piece by piece, as the learner reads:
        waiting for room for the whole chunk could wait forever on a learner that waits for
        more items than the queue then holds. A repeat of `origin` is checked again after the
        wait: the same chunk may have come meanwhile on a sender's new stream.
        """
        done = 0
        with self._cond:
            if self._seen(origin):
                return 0
            if self.env_steps_total + env_steps > MAX_COUNT:
                raise OverflowError(f"env_steps: {env_steps} more would carry the table's count of {self.env_steps_total} past 2**63 - 1")
            if n == 0:
                self.env_steps_total += env_steps
                self._note(origin)
            while done < n:
                self._wait(lambda: self._room() > 0, should_wait)
                if done == 0:
                    if self._seen(origin):
                        return 0
                    self._note(origin)
                stop = done + min(n - done, self._room())
                slots = write(done, stop)
                self._versions[slots] = policy_version
                self.sampler.on_insert(slots)
                # each piece counts its share of the env steps, so a chunk cut short by a departing writer counts what it stored
                self.env_steps_total += env_steps * stop // n - env_steps * done // n
                done = stop
                self._cond.notify_all()
        return n

    def _seen(self, origin: tuple[int, int] | None) -> bool:
        return origin is not None and origin[1] <= self._last_sequence.get(origin[0], 0)

    def _note(self, origin: tuple[int, int] | None) -> None:
        """Remember the sender's last stored sequence number; the longest-silent senders are forgotten first."""
        if origin is None:
            return
        self._last_sequence.pop(origin[0], None)
        self._last_sequence[origin[0]] = origin[1]
        if len(self._last_sequence) > MAX_SENDERS_REMEMBERED:
            del self._last_sequence[next(iter(self._last_sequence))]

    def sample(
        self,
        batch_size: int,
        num_batches: int = 1,
        block: bool = False,
        should_wait: Callable[[], bool] = lambda: True,
        min_policy_version: int = -1,
    ) -> SampledRows:
        """Draw `num_batches * batch_size` rows.

        Replay tables draw with replacement: with `block`, once the rate limiter allows it;
        without, at once, or NotEnoughDataError while fewer than `batch_size` items are stored.
        FIFO tables hand out the oldest unread items, each once, waiting for enough of them;
        with `spec.max_policy_lag` > 0, items acted by weights older than
        `min_policy_version - max_policy_lag` (the learner passes its current version) are dropped. Rows that would take
        more than `max_sample_bytes`, or a replay batch larger than the table's capacity (it would wait
        forever), raise SampleTooLargeError before anything is allocated.
        """
        rows = batch_size * num_batches
        record_size = self.layout.record_size + 12  # a record, its int64 key and float32 weight
        if self._max_sample_bytes is not None and rows * record_size > self._max_sample_bytes:
            raise SampleTooLargeError(
                f"batch_size * num_batches = {rows} rows of {record_size} bytes is over the {self._max_sample_bytes}-byte limit"
            )
        if self._fifo:
            return self._take(rows, should_wait, min_policy_version)
        if batch_size > self.storage.capacity:
            raise SampleTooLargeError(f"batch_size={batch_size} is over the table's capacity of {self.storage.capacity} items")
        with self._cond:
            if block:
                # and enough items for one batch: a learner's batch larger than min_size_to_sample waits, it is no error
                self._wait(
                    lambda: self._limiter.can_sample(self.storage.inserts_total, self._sampled_rows) and self.storage.size >= batch_size,
                    should_wait,
                )
            size = self.storage.size
            if size < batch_size:
                raise NotEnoughDataError(f"the table holds {size} items, fewer than batch_size={batch_size}")
            if isinstance(self.sampler, PrioritizedSampler):
                self.sampler.beta = self._importance_exponent()
            slots, weights = self.sampler.sample(rows, size, self._rng)
            sampled = self._sampled(slots, weights)
        return sampled

    def _importance_exponent(self) -> float:
        s = self.spec
        progress = min(1.0, self.env_steps_total / max(s.importance_anneal_env_steps, 1))
        return s.importance_exponent_start + (1.0 - s.importance_exponent_start) * progress

    def _sampled(self, slots: np.ndarray, weights: np.ndarray | None) -> SampledRows:
        """Gather `slots` and count the sample; call with the lock held."""
        records = self.storage.gather(slots)
        self._sampled_rows += len(slots)
        self._sample_calls += 1
        self._cond.notify_all()
        return SampledRows(records, self.layout, slots, weights, self.storage.inserts_total, self.env_steps_total, self.storage.capacity)

    def _take(self, rows: int, should_wait: Callable[[], bool], min_policy_version: int) -> SampledRows:
        if rows > self.storage.capacity:
            raise SampleTooLargeError(f"batch_size * num_batches = {rows} rows cannot come from a queue of {self.storage.capacity}")
        lag = self.spec.max_policy_lag
        with self._cond:
            while True:
                self._wait(lambda: self._unread() >= rows, should_wait)
                if lag and min_policy_version >= 0:
                    self._drop_stale(min_policy_version - lag)
                if self._unread() >= rows:
                    break
            keys = self._read_key + np.arange(rows)
            self._read_key += rows
            return self._sampled(keys % self.storage.capacity, None)

    def _drop_stale(self, oldest_version: int) -> None:
        """Skip unread items acted by weights older than `oldest_version`; the rest keep their order."""
        keys = np.arange(self._read_key, self.storage.inserts_total)
        slots = keys % self.storage.capacity
        fresh = self._versions[slots] >= oldest_version
        stale = len(keys) - int(fresh.sum())
        if stale:
            kept = slots[fresh]
            new_slots = (self.storage.inserts_total - len(kept) + np.arange(len(kept))) % self.storage.capacity
            self.storage.move(kept, new_slots)
            self._versions[new_slots] = self._versions[kept]
            self._read_key += stale
            self._dropped_stale += stale
            self._cond.notify_all()

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        """Set priorities of items still stored; returns how many were. ValueError for a non-prioritized table or bad values."""
        if not self.sampler.prioritized:
            raise ValueError(f"table kind {self.spec.kind!r} has no priorities")
        if len(keys) != len(priorities):
            raise ValueError(f"{len(keys)} keys but {len(priorities)} priorities")
        with self._cond:
            slots, live = self.storage.slots_of(keys)
            self.sampler.update_priorities(slots[live], np.asarray(priorities, np.float64)[live])
        return int(live.sum())

    def _wait(self, ready: Callable[[], bool], should_wait: Callable[[], bool]) -> None:
        while not ready():
            if self._closed or not should_wait():
                raise Closed("table closed while waiting on its rate limiter")
            self._cond.wait(timeout=0.1)

    def info(self) -> TableInfo:
        with self._cond:
            size = self._unread() if self._fifo else self.storage.size
            return TableInfo(
                kind=self.spec.kind,
                size=size,
                capacity=self.storage.capacity,
                inserts_total=self.storage.inserts_total,
                env_steps_total=self.env_steps_total,
                sampled_rows_total=self._sampled_rows,
                sample_calls_total=self._sample_calls,
                dropped_stale_total=self._dropped_stale,
            )

    def state_dict(self) -> dict[str, Any]:
        """Storage, sampler, counters and random state: what a snapshot of this table saves."""
        with self._cond:
            return self._state(self.storage.state_dict())

    def _state(self, storage: dict[str, Any]) -> dict[str, Any]:
        """The state around `storage`'s; call with the lock held. Item versions matter only to a queue's lag bound."""
        return {
            "storage": storage,
            "sampler": self.sampler.state_dict(),
            "versions": self._versions.copy() if self._fifo else np.zeros(0, np.int64),
            "counters": {
                "read_key": self._read_key,
                "env_steps_total": self.env_steps_total,
                "sampled_rows_total": self._sampled_rows,
                "sample_calls_total": self._sample_calls,
                "dropped_stale_total": self._dropped_stale,
            },
            "rng": self._rng.bit_generator.state,
            "senders": [[sender, sequence] for sender, sequence in self._last_sequence.items()],
        }

    def snapshot(self, write_records: Callable[[np.ndarray], None]) -> dict[str, Any]:
        """`state_dict()` without stopping the table and without copying its rows (Reverb blocks
        inserts and samples for a whole checkpoint). `write_records` is handed the stored rows
        themselves and writes them out (to a file) while inserts and samples go on; the rows that
        inserts changed meanwhile are then copied, under the lock, as the state's patch. Returned:
        the table's state at that moment, whose `records` are the array handed to `write_records`
        (for a replay table: the live rows, read only through the patch). A queue is copied whole
        under the lock: it is small, and moves its rows when it drops stale ones."""
        if self._fifo:
            state = self.state_dict()
            write_records(state["storage"]["records"])
            return state
        with self._cond:
            first_new_key = self.storage.inserts_total
            records = self.storage.live_records()
        write_records(records)
        with self._cond:
            return self._state(self.storage.patched_state(records, first_new_key))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`; a state that does not fit raises ValueError and changes nothing."""
        with self._cond:
            self.storage.check_state(state["storage"])
            versions = np.asarray(state["versions"], np.int64)
            if versions.shape != (self._versions.shape if self._fifo else (0,)):
                raise ValueError(f"versions: shape {versions.shape}, expected {self._versions.shape if self._fifo else (0,)}")
            try:
                senders = {int(sender): int(sequence) for sender, sequence in state["senders"]}
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"senders: not [sender id, sequence] pairs: {e}") from None
            rng = np.random.default_rng()
            try:
                rng.bit_generator.state = state["rng"]
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"rng: not a {type(rng.bit_generator).__name__} state: {e}") from None
            c = state["counters"]
            try:
                counters = [int(c[key]) for key in COUNTERS]
            except (TypeError, ValueError, KeyError, OverflowError) as e:  # OverflowError: an infinity
                raise ValueError(f"counters: not {', '.join(COUNTERS)}: {e!r}") from None
            if not all(0 <= count <= MAX_COUNT for count in counters):
                raise ValueError(f"counters: must be in [0, {MAX_COUNT}], got {dict(zip(COUNTERS, counters, strict=True))}")
            sampler = self._make_sampler()
            sampler.load_state_dict(state["sampler"])  # validates before anything of this table changes
            self.storage.load_state_dict(state["storage"])
            self.sampler = sampler
            if self._fifo:
                self._versions[:] = versions
            self._rng = rng
            self._last_sequence = senders
            self._read_key, self.env_steps_total, self._sampled_rows, self._sample_calls, self._dropped_stale = counters
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter with `Closed`; used at shutdown."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
