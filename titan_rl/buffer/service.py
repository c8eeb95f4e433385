"""gRPC face of the replay buffer: maps requests to ReplayBuffer calls and errors to status codes."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import numpy as np

from titan_rl import wire
from titan_rl.buffer.rate_limiter import RateLimiter
from titan_rl.buffer.replay import Closed, ReplayBuffer
from titan_rl.config import Config
from titan_rl.errors import NotEnoughDataError, ShapeMismatchError, WireError
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc

log = logging.getLogger(__name__)


def replay_from_config(cfg: Config) -> ReplayBuffer:
    limiter = RateLimiter(
        samples_per_insert=cfg.train.updates_per_env_step * cfg.train.batch_size,
        min_size_to_sample=cfg.train.min_buffer_size,
        slack_transitions=cfg.buffer_server.rate_limit_slack_transitions,
    )
    return ReplayBuffer(cfg.buffer_server.capacity_transitions, limiter, seed=cfg.seed)


def _fill_sample(sample: buffer_pb2.SampledBatch, fields: dict, indices: np.ndarray, inserts: int) -> None:
    """Fill the response's SampledBatch in place: nesting a separately built one would copy every byte again."""
    wire.fill_chunk(sample.batch, fields)
    wire.fill(sample.indices, indices)
    sample.inserts_total = inserts


def _check_sample_request(request: buffer_pb2.SampleRequest | buffer_pb2.SampleStreamRequest, context: grpc.ServicerContext) -> int:
    if request.batch_size <= 0:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch_size must be > 0, got {request.batch_size}")
    if request.num_batches < 0:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"num_batches must be >= 0, got {request.num_batches}")
    return max(request.num_batches, 1)


class BufferServicer(buffer_pb2_grpc.BufferServiceServicer):
    def __init__(self, replay: ReplayBuffer):
        self.replay = replay

    def Add(self, request_iterator: Iterator[buffer_pb2.AddRequest], context: grpc.ServicerContext) -> Iterator[buffer_pb2.AddResponse]:
        added = 0
        for request in request_iterator:
            try:
                if not request.HasField("chunk"):
                    raise WireError("missing")
                added += self.replay.add(wire.decode_chunk(request.chunk), should_wait=context.is_active)
            except (WireError, ShapeMismatchError) as e:
                log.warning("rejected chunk from %s: %s", context.peer(), e)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chunk.{e} ({added} transitions were stored before it)")
            except Closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, "buffer is shutting down")
            yield buffer_pb2.AddResponse(transitions_added=added)

    def Sample(self, request: buffer_pb2.SampleRequest, context: grpc.ServicerContext) -> buffer_pb2.SampleResponse:
        num_batches = _check_sample_request(request, context)
        try:
            sampled = self.replay.sample(request.batch_size, num_batches)
        except NotEnoughDataError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        response = buffer_pb2.SampleResponse()
        _fill_sample(response.sample, *sampled)
        return response

    def SampleStream(
        self, request_iterator: Iterator[buffer_pb2.SampleStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[buffer_pb2.SampleStreamResponse]:
        for request in request_iterator:
            num_batches = _check_sample_request(request, context)
            try:
                sampled = self.replay.sample(request.batch_size, num_batches, block=True, should_wait=context.is_active)
            except Closed:
                return
            response = buffer_pb2.SampleStreamResponse()
            _fill_sample(response.sample, *sampled)
            yield response

    def Info(self, request: buffer_pb2.InfoRequest, context: grpc.ServicerContext) -> buffer_pb2.InfoResponse:
        i = self.replay.info()
        return buffer_pb2.InfoResponse(
            size=i.size,
            capacity=i.capacity,
            inserts_total=i.inserts_total,
            sampled_rows_total=i.sampled_rows_total,
            sample_calls_total=i.sample_calls_total,
        )
