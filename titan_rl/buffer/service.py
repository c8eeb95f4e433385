"""gRPC face of the replay buffer: maps requests to ReplayBuffer calls and errors to status codes."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator

import grpc

from titan_rl import wire
from titan_rl.buffer.rate_limiter import RateLimiter
from titan_rl.buffer.replay import Closed, ReplayBuffer, SampledRows
from titan_rl.config import Config
from titan_rl.errors import NotEnoughDataError, SampleTooLargeError, ShapeMismatchError, WireError
from titan_rl.records import RecordLayout
from titan_rl.rpc import MAX_MESSAGE_BYTES
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

_END = object()


class _BadRequest(Exception):
    """A SampleStream credit that cannot be answered; its message names the field."""


def replay_from_config(cfg: Config) -> ReplayBuffer:
    limiter = RateLimiter(
        samples_per_insert=cfg.train.updates_per_env_step * cfg.train.batch_size,
        min_size_to_sample=cfg.train.min_buffer_size,
        slack_transitions=cfg.buffer_server.rate_limit_slack_transitions,
    )
    return ReplayBuffer(cfg.buffer_server.capacity_transitions, limiter, seed=cfg.seed, max_sample_bytes=MAX_MESSAGE_BYTES)


def _sample_request_problem(request: buffer_pb2.SampleRequest | buffer_pb2.SampleStreamRequest) -> str | None:
    if request.batch_size <= 0:
        return f"batch_size must be > 0, got {request.batch_size}"
    if request.num_batches < 0:
        return f"num_batches must be >= 0, got {request.num_batches}"
    return None


class BufferServicer(buffer_pb2_grpc.BufferServiceServicer):
    def __init__(self, replay: ReplayBuffer):
        self.replay = replay
        self._layout_message = common_pb2.RecordLayout()
        self._layout: RecordLayout | None = None

    def fill_sample(self, sample: buffer_pb2.SampledBatch, rows: SampledRows) -> None:
        """Fill the response's SampledBatch in place: nesting a separately built one would copy every byte again."""
        if rows.layout is not self._layout:  # the storage fixes its layout once, at the first insert
            self._layout_message, self._layout = wire.encode_layout(rows.layout), rows.layout
        wire.fill_records(sample.records, rows.records, self._layout_message)
        wire.fill(sample.indices, rows.indices)
        sample.inserts_total = rows.inserts_total

    def Add(self, request_iterator: Iterator[buffer_pb2.AddRequest], context: grpc.ServicerContext) -> Iterator[buffer_pb2.AddResponse]:
        added = 0
        for request in request_iterator:
            try:
                if request.HasField("chunk"):
                    added += self.replay.add_records(*wire.decode_chunk(request.chunk), should_wait=context.is_active)
                elif not request.ack:
                    raise WireError("missing (only a request with ack may come without one)")
            except (WireError, ShapeMismatchError) as e:
                where = f"chunk.transitions.{e}" if isinstance(e, ShapeMismatchError) else f"chunk.{e}"
                log.warning("rejected chunk from %s: %s", context.peer(), where)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{where} ({added} transitions were stored before it)")
            except Closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, "buffer is shutting down")
            if request.ack:
                yield buffer_pb2.AddResponse(transitions_added=added)

    def Sample(self, request: buffer_pb2.SampleRequest, context: grpc.ServicerContext) -> buffer_pb2.SampleResponse:
        if problem := _sample_request_problem(request):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            sampled = self.replay.sample(request.batch_size, max(request.num_batches, 1))
        except NotEnoughDataError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except SampleTooLargeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        response = buffer_pb2.SampleResponse()
        self.fill_sample(response.sample, sampled)
        return response

    def SampleStream(
        self, request_iterator: Iterator[buffer_pb2.SampleStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[buffer_pb2.SampleStreamResponse]:
        """Responses are built by a producer thread while this one sends the previous one: the
        gather releases the GIL, so sampling overlaps gRPC's send instead of following it."""
        ready: queue.Queue = queue.Queue(maxsize=1)
        producer = threading.Thread(target=self._produce, args=(request_iterator, context, ready), name="sample-producer", daemon=True)
        producer.start()
        while context.is_active():
            try:
                item = ready.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                return
            if isinstance(item, _BadRequest):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
            if isinstance(item, Exception):
                raise item
            yield item

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
                try:
                    sampled = self.replay.sample(request.batch_size, max(request.num_batches, 1), block=True, should_wait=context.is_active)
                except SampleTooLargeError as e:
                    raise _BadRequest(str(e)) from None
                response = buffer_pb2.SampleStreamResponse()
                self.fill_sample(response.sample, sampled)
                offer(response)
        except (Closed, grpc.RpcError):
            pass  # the buffer is closing or the client went away
        except Exception as e:  # handed to the gRPC thread, which reports it to the client
            offer(e)
        offer(_END)

    def Info(self, request: buffer_pb2.InfoRequest, context: grpc.ServicerContext) -> buffer_pb2.InfoResponse:
        i = self.replay.info()
        return buffer_pb2.InfoResponse(
            size=i.size,
            capacity=i.capacity,
            inserts_total=i.inserts_total,
            sampled_rows_total=i.sampled_rows_total,
            sample_calls_total=i.sample_calls_total,
        )
