"""gRPC face of the buffer: maps requests to its tables' calls and errors to status codes."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np

from titan_rl import wire
from titan_rl.algorithm import Algorithm
from titan_rl.buffer.samplers import MAX_PRIORITY
from titan_rl.buffer.senders import WorkerSenders
from titan_rl.buffer.sources import SourceStats
from titan_rl.buffer.table import Closed, SampledRows, Table
from titan_rl.errors import ConfigError, NotEnoughDataError, SampleTooLargeError, ShapeMismatchError, WireError
from titan_rl.memory import memory_limit_bytes, physical_memory_bytes
from titan_rl.records import RecordLayout
from titan_rl.rpc import MAX_MESSAGE_BYTES
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

_END = object()


class _BadRequest(Exception):
    """A SampleStream credit that cannot be answered; its message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class _NoSuchTable(_BadRequest):
    code = grpc.StatusCode.NOT_FOUND


def table_records_bytes(algorithm: Algorithm) -> int:
    """What the records of `algorithm`'s table take once it is full (its sampler's state comes on top)."""
    return algorithm.table().capacity_items * RecordLayout.for_spec(algorithm.record_spec()).record_size


def table_size_problem(algorithm: Algorithm) -> str:
    """The table's size and the keys that set it, for an error that it does not fit in memory."""
    spec = algorithm.table()
    gib = table_records_bytes(algorithm) / 2**30
    keys = "buffer_server.capacity_items" if spec.kind != "fifo" else "the algorithm's queue size"
    return f"table {spec.name!r} of {spec.capacity_items:,} records needs {gib:,.1f} GiB ({keys})"


def check_table_fits(algorithm: Algorithm) -> None:
    """ConfigError when the table's records alone take more than this process may use (`titan_rl.memory`)."""
    if table_records_bytes(algorithm) > (limit := memory_limit_bytes()):
        gib = f"{limit / 2**30:,.1f} GiB"
        why = (
            f"this machine's {gib}"
            if limit == physical_memory_bytes()
            else f"the {gib} this process's cgroup allows (its container's limit)"
        )
        raise ConfigError(f"{table_size_problem(algorithm)}, more than {why}")


def tables_for(algorithm: Algorithm, seed: int) -> dict[str, Table]:
    """The tables `algorithm` learns from, with its record spec as every table's signature."""
    spec = algorithm.table()
    check_table_fits(algorithm)
    try:
        return {spec.name: Table(spec, algorithm.record_spec(), seed=seed, max_sample_bytes=MAX_MESSAGE_BYTES)}
    except MemoryError as e:
        raise ConfigError(f"{table_size_problem(algorithm)}: more than this process can allocate") from e


def _sample_request_problem(request: buffer_pb2.SampleRequest | buffer_pb2.SampleStreamRequest) -> str | None:
    if request.batch_size <= 0:
        return f"batch_size must be > 0, got {request.batch_size}"
    if request.num_batches < 0:
        return f"num_batches must be >= 0, got {request.num_batches}"
    return None


class BufferServicer(buffer_pb2_grpc.BufferServiceServicer):
    def __init__(self, tables: dict[str, Table]):
        if not tables:
            raise ValueError("a buffer needs at least one table")
        self.tables = tables
        self.run_ended = threading.Event()
        self.sources = SourceStats()
        self.senders = WorkerSenders()
        self._learners = 0  # SampleStream calls open now
        self._learner_seen = time.monotonic()  # when one was last open (or the buffer started)
        self._learner_lock = threading.Lock()
        self._layout_messages: dict[str, common_pb2.RecordLayout] = {name: wire.encode_layout(t.layout) for name, t in tables.items()}

    def table(self, name: str, context: grpc.ServicerContext) -> tuple[str, Table]:
        """The table a request names (empty: the only one); NOT_FOUND names the field otherwise."""
        if not name and len(self.tables) == 1:
            name = next(iter(self.tables))
        if name not in self.tables:
            context.abort(grpc.StatusCode.NOT_FOUND, f"table: no table {name!r} (tables: {', '.join(self.tables)})")
        return name, self.tables[name]

    def fill_sample(self, sample: buffer_pb2.SampledBatch, name: str, rows: SampledRows) -> None:
        """Fill the response's SampledBatch in place: nesting a separately built one would copy every byte again."""
        wire.fill_records(sample.records, rows.records, self._layout_messages[name])
        if rows.weights is not None:  # a prioritized table: keys and weights, for the learner's priority updates
            wire.fill(sample.keys, rows.keys)
            wire.fill(sample.weights, rows.weights)
        sample.inserts_total = rows.inserts_total
        sample.env_steps_total = rows.env_steps_total

    def Add(self, request_iterator: Iterator[buffer_pb2.AddRequest], context: grpc.ServicerContext) -> Iterator[buffer_pb2.AddResponse]:
        added = 0
        for request in request_iterator:
            _, table = self.table(request.table, context)
            try:
                if request.HasField("chunk"):
                    chunk = request.chunk
                    records, layout = wire.decode_chunk(chunk)
                    if chunk.env_steps <= 0 and len(records):
                        raise WireError(f"env_steps: must be > 0 for {len(records)} records, got {chunk.env_steps} (an older actor?)")
                    if chunk.env_steps < 0:  # a chunk without records still must not take steps off the count
                        raise WireError(f"env_steps: must be >= 0, got {chunk.env_steps}")
                    if chunk.sender_id and chunk.sequence < 1:  # would pass for a chunk stored before, and be dropped unsaid
                        raise WireError(f"sequence: must be >= 1 with a sender_id, got {chunk.sequence}")
                    returns, lengths = wire.decode_chunk_episodes(chunk)
                    if chunk.sender_id and (problem := self.senders.claim(chunk.replica_id, chunk.worker_id, chunk.sender_id)):
                        log.warning("rejected chunk from %s: %s", context.peer(), problem)
                        context.abort(
                            grpc.StatusCode.FAILED_PRECONDITION, f"chunk.replica_id: {problem} ({added} records were stored before it)"
                        )
                    origin = (chunk.sender_id, chunk.sequence) if chunk.sender_id else None
                    stored = table.insert_records(
                        records, layout, chunk.env_steps, chunk.policy_version, should_wait=context.is_active, origin=origin
                    )
                    if stored:  # not a chunk stored before (a sender resending after a broken stream)
                        self.sources.record(
                            chunk.replica_id, chunk.worker_id, chunk.env_steps, stored, chunk.policy_version, returns, lengths
                        )
                    added += stored
                elif not request.ack:
                    raise WireError("missing (only a request with ack may come without one)")
            except (WireError, ShapeMismatchError, SampleTooLargeError, OverflowError) as e:
                where = f"chunk.records.{e}" if isinstance(e, ShapeMismatchError) else f"chunk.{e}"
                log.warning("rejected chunk from %s: %s", context.peer(), where)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where} ({added} records were stored before it)")
            except Closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, "buffer is shutting down")
            if request.ack:
                yield buffer_pb2.AddResponse(items_added=added)

    def Sample(self, request: buffer_pb2.SampleRequest, context: grpc.ServicerContext) -> buffer_pb2.SampleResponse:
        if problem := _sample_request_problem(request):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        name, table = self.table(request.table, context)
        if table.spec.kind == "fifo":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"table: {name!r} is a queue: read it with SampleStream")
        try:
            sampled = table.sample(request.batch_size, max(request.num_batches, 1))
        except NotEnoughDataError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except SampleTooLargeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        response = buffer_pb2.SampleResponse()
        self.fill_sample(response.sample, name, sampled)
        return response

    def SampleStream(
        self, request_iterator: Iterator[buffer_pb2.SampleStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[buffer_pb2.SampleStreamResponse]:
        """Responses are built by a producer thread while this one sends the previous one: the
        gather releases the GIL, so sampling overlaps gRPC's send instead of following it."""
        ready: queue.Queue = queue.Queue(maxsize=1)
        producer = threading.Thread(target=self._produce, args=(request_iterator, context, ready), name="sample-producer", daemon=True)
        producer.start()
        with self._learner_lock:
            self._learners += 1
        try:
            while context.is_active():
                try:
                    item = ready.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                if isinstance(item, _BadRequest):
                    context.abort(item.code, str(item))
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            with self._learner_lock:
                self._learners -= 1
                self._learner_seen = time.monotonic()

    def learner_absent_s(self) -> float:
        """Seconds since a learner last had a SampleStream open (0 while one has)."""
        with self._learner_lock:
            return 0.0 if self._learners else time.monotonic() - self._learner_seen

    def _produce(
        self, request_iterator: Iterator[buffer_pb2.SampleStreamRequest], context: grpc.ServicerContext, ready: queue.Queue
    ) -> None:
        """Answer each credit with a response in `ready`; ends with _END, after an exception if one ended it."""

        def offer(item: object) -> None:
            while context.is_active():
                with contextlib.suppress(queue.Full):
                    ready.put(item, timeout=0.1)
                    return

        try:
            for request in request_iterator:
                if problem := _sample_request_problem(request):
                    raise _BadRequest(problem)
                name = request.table or (next(iter(self.tables)) if len(self.tables) == 1 else "")
                if name not in self.tables:
                    raise _NoSuchTable(f"table: no table {request.table!r} (tables: {', '.join(self.tables)})")
                try:
                    sampled = self.tables[name].sample(
                        request.batch_size,
                        max(request.num_batches, 1),
                        block=True,
                        should_wait=context.is_active,
                        min_policy_version=request.min_policy_version,
                    )
                except SampleTooLargeError as e:
                    raise _BadRequest(str(e)) from None
                response = buffer_pb2.SampleStreamResponse()
                self.fill_sample(response.sample, name, sampled)
                offer(response)
        except (Closed, grpc.RpcError):
            pass  # the buffer is closing or the client went away
        except Exception as e:  # handed to the gRPC thread, which reports it to the client
            offer(e)
        offer(_END)

    def UpdatePriorities(
        self, request: buffer_pb2.UpdatePrioritiesRequest, context: grpc.ServicerContext
    ) -> buffer_pb2.UpdatePrioritiesResponse:
        _, table = self.table(request.table, context)
        try:
            keys = wire.decode(request.keys, "keys")
            priorities = wire.decode(request.priorities, "priorities")
            if keys.ndim != 1 or keys.dtype.kind not in "iu":
                raise WireError(f"keys: must be a vector of integers, got {keys.dtype.name} of shape {keys.shape}")
            if priorities.shape != keys.shape or priorities.dtype.kind != "f":
                raise WireError(f"priorities: must be {len(keys)} floats, got {priorities.dtype.name} of shape {priorities.shape}")
            if not np.all(np.isfinite(priorities)) or np.any(priorities < 0) or np.any(priorities > MAX_PRIORITY):
                raise WireError(f"priorities: must be finite, >= 0 and <= {MAX_PRIORITY:g}")
            updated = table.update_priorities(keys, priorities)
        except WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ValueError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"table: {e}")
        return buffer_pb2.UpdatePrioritiesResponse(updated=updated)

    def Info(self, request: buffer_pb2.InfoRequest, context: grpc.ServicerContext) -> buffer_pb2.InfoResponse:
        name, table = self.table(request.table, context)
        i = table.info()
        return buffer_pb2.InfoResponse(
            table=name,
            kind=i.kind,
            size=i.size,
            capacity=i.capacity,
            inserts_total=i.inserts_total,
            env_steps_total=i.env_steps_total,
            sampled_rows_total=i.sampled_rows_total,
            sample_calls_total=i.sample_calls_total,
            dropped_stale_total=i.dropped_stale_total,
            signature=self._layout_messages[name],
        )

    def Sources(self, request: buffer_pb2.SourcesRequest, context: grpc.ServicerContext) -> buffer_pb2.SourcesResponse:
        response = self.sources.response()
        response.dropped_stale_total = sum(table.info().dropped_stale_total for table in self.tables.values())
        return response

    def EndRun(self, request: buffer_pb2.EndRunRequest, context: grpc.ServicerContext) -> buffer_pb2.EndRunResponse:
        log.info("run ended (%s), told by %s", request.reason or "no reason given", context.peer())
        self.run_ended.set()
        return buffer_pb2.EndRunResponse()
