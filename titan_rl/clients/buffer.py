"""Clients of the buffer service: a chunk sender for actors, a batch prefetcher and a priority updater for the learner."""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from titan_rl import wire
from titan_rl.errors import PeerUnavailableError, RejectedError, TitanError, WireError
from titan_rl.rpc import REFUSED_FOR_GOOD, RETRYABLE, Backoff, call_with_retry, make_channel, wait_until_ready
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc

log = logging.getLogger(__name__)

_END = object()
_ACK_NOW = buffer_pb2.AddRequest(ack=True).SerializeToString()  # asks for an ack of everything sent, with no chunk
DEFAULT_MAX_IN_FLIGHT = 4  # unacknowledged chunks, for a sender that does not know its chunk sizes (workers use chunks_in_flight)
# Transitions a sender may have unacknowledged: the default of rollout_server.max_unacked_rows. While
# the rate limiter holds inserts back, a worker waits with this many rows in flight, collected by a
# policy that old: 4,096 rows per worker left a seed unsolved in 2 of 2 solve_time runs, 1,024 in 1
# of 4, 512 in none of 3 (docs/architecture.md).
MAX_UNACKED_ROWS = 512
WAIT_LOG_S = 10.0  # a send() blocked this long logs why
JOIN_TIMEOUT_S = 2.0  # a background thread notices a stop within READY_POLL_S


def ack_every(max_in_flight: int) -> int:
    """How often ChunkSender asks for an ack: every half window, so one is always on its way back."""
    return max(1, max_in_flight // 2)


def chunks_in_flight(rows_per_chunk: int, max_unacked_rows: int = MAX_UNACKED_ROWS) -> int:
    """ChunkSender's window for chunks of `rows_per_chunk` rows: `max_unacked_rows` rows, and at least 2 chunks."""
    return max(2, max_unacked_rows // max(1, rows_per_chunk))


_BUFFER_SERVICE = buffer_pb2.DESCRIPTOR.services_by_name["BufferService"]
ADD_METHOD = f"/{_BUFFER_SERVICE.full_name}/Add"  # ChunkSender calls it with AddRequests it serialised itself


@dataclass
class Sample:
    """Sampled rows as they came off the wire: read-only field views, item keys, importance weights."""

    fields: dict[str, np.ndarray]
    keys: np.ndarray | None  # prioritized tables only, as `weights`
    weights: np.ndarray | None
    env_steps_total: int

    def __len__(self) -> int:
        return len(next(iter(self.fields.values())))

    def batches(self, batch_size: int) -> list[Sample]:
        """Consecutive slices of `batch_size` rows (the message holds whole batches)."""
        n = len(self) // batch_size
        if n * batch_size != len(self):
            raise WireError(f"records: {len(self)} rows are not whole batches of {batch_size}")
        out = []
        for i in range(n):
            rows = slice(i * batch_size, (i + 1) * batch_size)
            keys = None if self.keys is None else self.keys[rows]
            weights = None if self.weights is None else self.weights[rows]
            out.append(Sample({k: a[rows] for k, a in self.fields.items()}, keys, weights, self.env_steps_total))
        return out


def decode_sample(sample: buffer_pb2.SampledBatch) -> Sample:
    records, layout = wire.decode_records(sample.records)
    keys = wire.decode(sample.keys, "keys") if sample.HasField("keys") else None
    weights = wire.decode(sample.weights, "weights") if sample.HasField("weights") else None
    for name, values in (("keys", keys), ("weights", weights)):
        if values is not None and len(values) != len(records):
            raise WireError(f"{name}: {len(values)} for {len(records)} records")
    return Sample(layout.views(records), keys, weights, sample.env_steps_total)


class BufferClient:
    """Unary calls: info and one-off samples. Every call has a timeout."""

    def __init__(self, address: str, timeout_s: float = 10.0):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = make_channel(address)
        self.stub = buffer_pb2_grpc.BufferServiceStub(self._channel)
        self._said_no_sources = False

    def info(self, table: str = "") -> buffer_pb2.InfoResponse:
        request = buffer_pb2.InfoRequest(table=table)
        return call_with_retry(lambda: self.stub.Info(request, timeout=self.timeout_s), f"buffer {self.address} Info")

    def sample(self, batch_size: int, num_batches: int = 1, table: str = "") -> Sample:
        request = buffer_pb2.SampleRequest(batch_size=batch_size, num_batches=num_batches, table=table)
        return decode_sample(self.stub.Sample(request, timeout=self.timeout_s).sample)

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray, table: str = "") -> int:
        """New priorities for sampled keys; returns how many items were still stored."""
        request = buffer_pb2.UpdatePrioritiesRequest(table=table)
        wire.fill(request.keys, np.asarray(keys, np.int64))
        wire.fill(request.priorities, np.asarray(priorities, np.float32))
        return self.stub.UpdatePriorities(request, timeout=self.timeout_s).updated

    def sources(self) -> buffer_pb2.SourcesResponse | None:
        """What each rollout replica has sent (episodes, env steps, versions), or None if the buffer does not answer in time."""
        try:
            return self.stub.Sources(buffer_pb2.SourcesRequest(), timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED and not self._said_no_sources:
                log.warning("buffer %s has no Sources call (an older version): no episode statistics", self.address)
                self._said_no_sources = True
            return None

    def end_run(self, reason: str) -> None:
        """Tell the buffer that training has ended: it saves its snapshot and exits."""
        request = buffer_pb2.EndRunRequest(reason=reason)
        call_with_retry(lambda: self.stub.EndRun(request, timeout=self.timeout_s), f"buffer {self.address} EndRun", deadline_s=10.0)

    def close(self) -> None:
        self._channel.close()


@dataclass
class _Sent:
    """A request on the stream, kept until an ack covers it: a broken stream resends it."""

    payload: bytes
    is_chunk: bool
    asks_ack: bool


class ChunkSender:
    """Streams record chunks to the buffer's Add from a background thread, and never loses one.

    At most `max_in_flight` chunks are unacknowledged at once: `send()` blocks beyond that, so
    a slow (or rate-limited, or unreachable) buffer slows the actor down instead of letting
    stale data pile up; the window is the bounded queue an outage fills. Every
    `max_in_flight // 2`-th chunk asks for an acknowledgement, which covers it and every chunk
    before it: a reply per chunk cost both processes as much CPU as the chunk itself.
    `flush()` asks for one at once. A broken stream is reopened with back-off and every
    unacknowledged chunk is sent again; each carries this sender's random id and a sequence
    number, so the buffer stores a chunk once even when it got it before the break. After
    `give_up_after_s` without reaching the buffer, `send()` raises PeerUnavailableError.
    INVALID_ARGUMENT (or another status that is not retried) is raised from the next `send()`; as
    RejectedError for a wrong token, table or peer (REFUSED_FOR_GOOD), which no new sender would change:
    its worker stops for good. INVALID_ARGUMENT (a record the table refuses, such as a nan an env
    returned once) ends only the worker, which is started again, until the pool sees a crash loop.
    `send()` is for one producer thread.
    """

    def __init__(self, address: str, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, give_up_after_s: float = 120.0, table: str = ""):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.address = address
        self.table = table
        self.give_up_after_s = give_up_after_s
        self.sender_id = secrets.randbits(63)
        self.chunks_acked = 0
        self.chunks_resent = 0
        self._max_in_flight = max_in_flight
        self._ack_every = ack_every(max_in_flight)
        self._slots = threading.Semaphore(max_in_flight)
        self._sequence = 0
        self._unasked = 0  # chunks queued since the last one that asked for an ack
        self._unacked: deque[_Sent] = deque()  # on the stream, oldest first
        self._lock = threading.Lock()
        self._requests: queue.Queue = queue.Queue()
        self._error: Exception | None = None
        self._closing = threading.Event()
        self._call = None
        self._thread = threading.Thread(target=self._run, name="chunk-sender", daemon=True)
        self._thread.start()

    def send(
        self,
        fields: Mapping[str, np.ndarray],
        worker_id: int,
        policy_version: int,
        env_steps: int | None = None,
        keep_waiting: Callable[[], bool] = lambda: True,
        episode_returns: Sequence[float] = (),
        episode_lengths: Sequence[int] = (),
        replica_id: int = 0,
    ) -> bool:
        """Queue a chunk of records once a slot is free; False if `keep_waiting()` turned False first.

        `env_steps`: env steps taken since the previous chunk (default: one per record); the episodes
        that finished in them and this sender's replica go with it, for the buffer's statistics."""
        request = buffer_pb2.AddRequest(table=self.table)
        wire.fill_chunk(request.chunk, fields, worker_id, policy_version, env_steps, episode_returns, episode_lengths, replica_id)
        request.chunk.sender_id, request.chunk.sequence = self.sender_id, self._sequence + 1
        with self._lock:
            request.ack = self._unasked + 1 >= self._ack_every
        payload = request.SerializeToString()  # here, while earlier chunks are in flight, not on the sending thread
        waited_from = time.monotonic()
        while not self._slots.acquire(timeout=0.2):
            if self._error is not None or not self._thread.is_alive():
                raise self._error or TitanError("chunk sender stopped")
            if not keep_waiting():
                return False
            if time.monotonic() - waited_from > WAIT_LOG_S:
                log.warning(
                    "buffer %s: %d chunks wait for it (the most this worker holds: rollout_server.max_unacked_rows); acting paused",
                    self.address,
                    self._max_in_flight,
                )
                waited_from = time.monotonic()
        if self._error is not None:
            raise self._error
        with self._lock:
            self._sequence += 1
            self._unasked += 1
            self._queue(_Sent(payload, True, request.ack))
        return True

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(sent.is_chunk for sent in self._unacked)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every sent chunk is acknowledged; False on timeout."""
        with self._lock:
            if self._unasked:
                self._queue(_Sent(_ACK_NOW, False, True))  # the last chunks did not ask
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.in_flight == 0:
                return True
            time.sleep(0.01)
        return False

    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Wait up to `flush_timeout_s` for acknowledgements, then end the stream (0: drop what is in flight)."""
        self.flush(flush_timeout_s)
        self._closing.set()
        self._requests.put(_END)
        if self._call is not None:
            self._call.cancel()
        self._thread.join(1.0)

    def _queue(self, sent: _Sent) -> None:
        """Hand a request to the stream and keep it until acknowledged. Call with the lock held."""
        if sent.asks_ack:
            self._unasked = 0
        self._unacked.append(sent)
        self._requests.put(sent.payload)

    def _acknowledged(self) -> bool:
        """One ack arrived: it covers every request up to the oldest one that asked. False if none asked."""
        with self._lock:
            if not any(sent.asks_ack for sent in self._unacked):
                return False
            chunks = 0
            while True:
                sent = self._unacked.popleft()
                chunks += sent.is_chunk
                if sent.asks_ack:
                    break
            self.chunks_acked += chunks  # with the count, so flush() never returns before it
        for _ in range(chunks):
            self._slots.release()
        return True

    def _stream(self, requests: queue.Queue) -> Iterator[bytes]:
        while (item := requests.get()) is not _END:
            yield item

    def _resend_unacked(self) -> int:
        """A new request queue holding every unacknowledged request, in order; returns the chunks in it.

        Replaced under the lock, so a chunk sent meanwhile goes after them, on the next stream."""
        with self._lock:
            self._requests = queue.Queue()
            for sent in self._unacked:
                self._requests.put(sent.payload)
            chunks = sum(sent.is_chunk for sent in self._unacked)
            self.chunks_resent += chunks
            return chunks

    def _fail(self, error: TitanError) -> None:
        """Stop for good: the error first, then the slots, so a send() woken by them raises it."""
        self._error = error
        log.error("%s", error)
        with self._lock:
            chunks = sum(sent.is_chunk for sent in self._unacked)
            self._unacked.clear()
        for _ in range(chunks):
            self._slots.release()

    def _run(self) -> None:
        channel = make_channel(self.address)
        add = channel.stream_stream(ADD_METHOD, request_serializer=None, response_deserializer=buffer_pb2.AddResponse.FromString)
        backoff = Backoff()
        contact = time.monotonic()
        try:
            while True:
                try:
                    if not wait_until_ready(channel, contact, self.give_up_after_s, self._closing, f"buffer {self.address}"):
                        return
                except PeerUnavailableError as e:
                    self._fail(e)
                    return
                contact = time.monotonic()  # connected: the buffer is there
                try:
                    self._call = add(self._stream(self._requests), wait_for_ready=True)
                    for _ in self._call:
                        if not self._acknowledged():
                            self._fail(TitanError(f"buffer {self.address} acknowledged chunks that did not ask: an older buffer?"))
                            self._call.cancel()
                            return
                        contact = time.monotonic()
                        backoff.reset()
                    return  # the stream ended because close() was called
                except grpc.RpcError as e:
                    if self._closing.is_set():
                        return
                    if e.code() not in RETRYABLE:
                        refused = RejectedError if e.code() in REFUSED_FOR_GOOD else TitanError
                        self._fail(refused(f"buffer {self.address} rejected a chunk: {e.code().name}: {e.details()}"))
                        return
                    waiting = self._resend_unacked()  # on a new request queue: the old one belongs to the dead call
                    log.warning(
                        "buffer stream %s: %s; reconnecting in %.1fs, then %d unacknowledged chunks are sent again",
                        self.address,
                        e.code().name,
                        backoff.delay_s,
                        waiting,
                    )
                    backoff.sleep()
        finally:
            channel.close()


class BatchPrefetcher:
    """Keeps `prefetch_requests` SampleStream requests in flight and decodes replies in a
    background thread, so a batch is usually ready before the learner asks for it.

    Each request asks for `batches_per_request` batches stacked in one message; `next()`
    slices them off one at a time, so it returns ordinary batches of `batch_size` rows
    while the queue between the threads moves whole messages (one hand-off per message,
    not per batch). `min_policy_version()` is read as each request is sent (a FIFO table
    drops items acted by older weights). A broken stream is reopened with back-off.
    `next()` is for one consumer thread (the training loop).
    """

    def __init__(
        self,
        address: str,
        batch_size: int,
        batches_per_request: int = 4,
        prefetch_requests: int = 2,
        table: str = "",
        min_policy_version: Callable[[], int] = lambda: -1,
        peer_timeout_s: float | None = None,
    ):
        self.address = address
        self.batch_size = batch_size
        self.peer_timeout_s = peer_timeout_s
        self.env_steps_total = 0
        self._request = buffer_pb2.SampleStreamRequest(batch_size=batch_size, num_batches=batches_per_request, table=table)
        self._min_policy_version = min_policy_version
        self._prefetch_requests = prefetch_requests
        self._credits: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue(maxsize=prefetch_requests)
        self._current: list[Sample] = []
        self._next_batch = 0
        self._error: Exception | None = None
        self._stop = threading.Event()
        self._channel = make_channel(address)
        self._stub = buffer_pb2_grpc.BufferServiceStub(self._channel)
        self._call = None
        self._thread = threading.Thread(target=self._run, name="batch-prefetcher", daemon=True)
        self._thread.start()

    def next(self, timeout_s: float | None = None) -> Sample | None:
        """The next batch, or None if none arrived within `timeout_s` (the rate limiter may hold it back)."""
        if self._next_batch >= len(self._current):
            try:
                self._current, self._next_batch = self._ready.get(timeout=timeout_s), 0
            except queue.Empty:
                if self._error is not None:
                    raise self._error from None
                return None
        k, self._next_batch = self._next_batch, self._next_batch + 1
        return self._current[k]

    def _credit(self) -> buffer_pb2.SampleStreamRequest:
        version = self._min_policy_version()
        if version < 0:
            return self._request
        request = buffer_pb2.SampleStreamRequest()
        request.CopyFrom(self._request)
        request.min_policy_version = version
        return request

    def _put(self, rows: list[Sample]) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(rows, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _requests(self, credits: queue.Queue) -> Iterator[buffer_pb2.SampleStreamRequest]:
        while (item := credits.get()) is not _END:
            yield item

    def _run(self) -> None:
        backoff = Backoff()
        contact = time.monotonic()
        while not self._stop.is_set():
            try:
                if not wait_until_ready(self._channel, contact, self.peer_timeout_s, self._stop, f"buffer {self.address}"):
                    return
            except PeerUnavailableError as e:
                self._error = e
                log.error("%s", e)
                return
            credits: queue.Queue = queue.Queue()
            self._credits = credits
            for _ in range(self._prefetch_requests):
                credits.put(self._credit())
            try:
                self._call = self._stub.SampleStream(self._requests(credits), wait_for_ready=True)
                for reply in self._call:
                    credits.put(self._credit())  # at once, so the server samples while this reply is decoded
                    sample = decode_sample(reply.sample)
                    self.env_steps_total = sample.env_steps_total
                    if not self._put(sample.batches(self.batch_size)):  # blocks while the queue is full: prefetch stays bounded
                        return
                    backoff.reset()
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                if e.code() not in RETRYABLE:
                    self._error = TitanError(f"buffer {self.address} SampleStream: {e.code().name}: {e.details()}")
                    log.error("%s", self._error)
                    return
                log.warning("sample stream %s: %s; reopening in %.1fs", self.address, e.code().name, backoff.delay_s)
            except Exception as e:  # a reply this client cannot read (retrying would get the same), or a bug here
                self._error = TitanError(f"buffer {self.address} SampleStream sent an unreadable batch: {e}")
                log.exception("%s", self._error)
                if self._call is not None:
                    self._call.cancel()
                return
            finally:
                credits.put(_END)
            contact = time.monotonic()  # the stream was open until now
            if not self._stop.is_set():
                backoff.sleep()

    def close(self) -> None:
        """Stop the thread, then close the channel: closing it under a call in flight can crash gRPC at exit."""
        self._stop.set()
        self._credits.put(_END)
        if self._call is not None:
            self._call.cancel()
        self._thread.join(JOIN_TIMEOUT_S)
        self._channel.close()


class PriorityUpdater:
    """Sends new priorities to the buffer from a background thread, off the learner's critical path.

    `put()` never blocks: what piles up while an UpdatePriorities call is in flight goes in the
    next call, as one message. A failed call is logged and its priorities dropped (they are
    refreshed the next time those items are sampled).
    """

    def __init__(self, address: str, table: str = "", timeout_s: float = 10.0):
        self._client = BufferClient(address, timeout_s)
        self.table = table
        self.sent_total = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._sending = False
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="priority-updater", daemon=True)
        self._thread.start()

    def put(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        with self._cond:
            self._pending.append((keys, priorities))
            self._cond.notify()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything put so far was sent; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._sending, timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed and not self._pending:
                    return
                pending, self._pending = self._pending, []
                self._sending = True
            keys = np.concatenate([k for k, _ in pending])
            priorities = np.concatenate([p for _, p in pending])
            try:
                self._client.update_priorities(keys, priorities, self.table)
                self.sent_total += len(keys)
            except grpc.RpcError as e:
                log.warning(
                    "buffer %s UpdatePriorities: %s: %s; %d priorities dropped", self._client.address, e.code().name, e.details(), len(keys)
                )
            with self._cond:
                self._sending = False
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5.0)
        self._client.close()
