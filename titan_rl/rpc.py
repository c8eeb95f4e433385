"""gRPC plumbing shared by the three services: channel options, servers with health, retries."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from titan_rl.auth import TokenServerInterceptor, current_token, token_header
from titan_rl.errors import PeerUnavailableError
from titan_rl.interceptors import HeadersClientInterceptor
from titan_rl.shared_keys import SharedKeysServerInterceptor, shared_keys_header
from titan_rl.tls import channel_credentials, current_tls, server_credentials

log = logging.getLogger(__name__)

# Weights of a large policy and big sample batches exceed gRPC's 4 MiB default on purpose.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# A channel whose peer is not listening yet (services start together) or any more (a restart) tries
# again after a back-off. gRPC's default starts at 1 s and grows to 120 s (±20% jitter): a peer up
# 0.3 s after the first try was reached 0.8 s later, and one back after 6 s down 2.6-3.2 s later.
# 0.1 s growing to 1 s costs a few refused connects a second while a peer is down.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
CLIENT_OPTIONS = CHANNEL_OPTIONS + RECONNECT_OPTIONS
# gRPC turns SO_REUSEPORT on by default: two services given the same port would then both bind it
# and the kernel would split connections between them. Off, the second bind fails.
SERVER_OPTIONS = CHANNEL_OPTIONS + [("grpc.http2.min_ping_interval_without_data_ms", 10_000), ("grpc.so_reuseport", 0)]

T = TypeVar("T")


def make_channel(address: str) -> grpc.Channel:
    """A channel to a peer, over TLS if this process has TLS settings (titan_rl.tls), sending its
    token (titan_rl.auth) and its values of the run's shared keys (titan_rl.shared_keys) with every
    call where it has them."""
    tls = current_tls()
    if tls is None:
        channel = grpc.insecure_channel(address, options=CLIENT_OPTIONS)
    else:
        channel = grpc.secure_channel(address, channel_credentials(tls), options=CLIENT_OPTIONS)
    headers = [token_header(token)] if (token := current_token()) else []
    if (shared := shared_keys_header()) is not None:
        headers.append(shared)
    return grpc.intercept_channel(channel, HeadersClientInterceptor(headers)) if headers else channel


# Every open stream (an actor's Add, a learner's SampleStream, an actor's WatchPolicy) holds one
# server thread for its whole life. The pool starts threads only when needed, so a large cap costs
# nothing idle; past the RPC cap a caller gets RESOURCE_EXHAUSTED instead of waiting forever.
MAX_SERVER_THREADS = 1024
MAX_CONCURRENT_RPCS = MAX_SERVER_THREADS - 16


class _Undecodable:
    """What the bytes of a request that does not parse become: the servicer is never handed one."""

    def __init__(self, error: DecodeError):
        self.error = error


def _refuse(context: grpc.ServicerContext, request: _Undecodable) -> NoReturn:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.error}")


class RefuseUndecodable(grpc.ServerInterceptor):
    """Answers a request whose bytes do not parse as its message INVALID_ARGUMENT, naming the message.

    gRPC parses a request before any servicer code runs and answers one that does not parse
    INTERNAL ("Exception deserializing request!"): to a client, a server bug. Here the parse
    error becomes a value the wrapped handler refuses, one request of a stream at a time.
    """

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as e:
                return _Undecodable(e)

        def one(behavior: Callable) -> Callable:
            def checked(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    _refuse(context, request)
                return behavior(request, context)

            return checked

        def stream(behavior: Callable) -> Callable:
            def checked(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
                def requests() -> Iterator[Any]:
                    for request in request_iterator:
                        if isinstance(request, _Undecodable):
                            _refuse(context, request)
                        yield request

                return behavior(requests(), context)

            return checked

        codecs = {"request_deserializer": deserialize, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(one(handler.unary_unary), **codecs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(one(handler.unary_stream), **codecs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(stream(handler.stream_unary), **codecs)
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **codecs)


def make_server(host: str, port: int) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A server bound to host:port (0 picks a free port) with the standard health service.

    Health reports NOT_SERVING until the caller sets SERVING once everything is ready. With a
    token (titan_rl.auth), every call but health must carry it; a call that carries values of the
    run's shared keys must agree with this service's (titan_rl.shared_keys); with TLS settings (titan_rl.tls),
    the port speaks only TLS (and demands a client certificate under mutual TLS). A request that
    does not parse is INVALID_ARGUMENT (`RefuseUndecodable`).
    Returns the server (not started), the bound port and the health servicer.
    """
    token, shared = current_token(), shared_keys_header()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=MAX_SERVER_THREADS),
        interceptors=[
            *([TokenServerInterceptor(token)] if token else []),
            *([SharedKeysServerInterceptor(shared[1])] if shared else []),
            RefuseUndecodable(),
        ],
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    tls = current_tls()
    try:
        if tls is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", server_credentials(tls))
    except RuntimeError as error:  # grpc reports a failed bind this way
        raise OSError(f"cannot bind {host}:{port}: address in use or not available") from error
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, bound, health_servicer


def set_serving(health_servicer: health.HealthServicer, service_names: list[str]) -> None:
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def is_serving(address: str, timeout_s: float = 1.0) -> bool:
    channel = make_channel(address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        channel.close()


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# a wrong token, or table, or a peer that is not the service asked for (another one's port), or one
# started with other values of the keys both read (titan_rl.shared_keys): a new caller, a restarted
# worker, would be refused the same way
REFUSED_FOR_GOOD = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION,
)
READY_POLL_S = 0.5
READY_WARN_S = 5.0  # a peer that has not answered this long is logged, again at twice the time, and so on


class Backoff:
    """Exponential back-off with a cap; `sleep()` waits the next delay."""

    def __init__(self, initial_s: float = 0.1, max_s: float = 5.0):
        self.initial_s, self.max_s = initial_s, max_s
        self.delay_s = initial_s

    def sleep(self) -> float:
        delay = self.delay_s
        time.sleep(delay)
        self.delay_s = min(self.delay_s * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self.delay_s = self.initial_s


def call_with_retry(fn: Callable[[], T], what: str, deadline_s: float = 60.0) -> T:
    """Call `fn`, retrying UNAVAILABLE / DEADLINE_EXCEEDED with back-off until `deadline_s` passes."""
    backoff = Backoff()
    end = time.monotonic() + deadline_s
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or time.monotonic() >= end:
                if e.code() in RETRYABLE:
                    raise PeerUnavailableError(f"{what}: gave up after {deadline_s:.0f}s: {e.details()}") from e
                raise
            log.warning("%s: %s, retrying in %.1fs", what, e.code().name, backoff.delay_s)
            backoff.sleep()


def wait_until_ready(channel: grpc.Channel, contact: float, peer_timeout_s: float | None, stop: threading.Event, peer: str) -> bool:
    """Wait until the peer behind `channel` answers a health check: True once it has, False if `stop`
    is set first. Raises PeerUnavailableError naming `peer` once `peer_timeout_s` (None: never)
    passed since `contact`, the monotonic time of the last sign of the peer.

    A health call with a short deadline rather than `grpc.channel_ready_future`: that one polls
    from a thread of gRPC's own, which raises when the channel is closed under it."""
    stub = health_pb2_grpc.HealthStub(channel)
    warn_after_s = READY_WARN_S
    while not stop.is_set():
        try:
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=READY_POLL_S, wait_for_ready=True)
            return True
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE:
                return True  # it answered (a server without health, say): the call itself will tell what is wrong
        except ValueError:  # the channel was closed: its owner is stopping
            return False
        gone_s = time.monotonic() - contact
        if peer_timeout_s is not None and gone_s >= peer_timeout_s:
            raise PeerUnavailableError(f"{peer} unreachable for {gone_s:.0f}s (durability.peer_timeout_s={peer_timeout_s:g})")
        if gone_s >= warn_after_s:
            limit = "" if peer_timeout_s is None else f"; giving up at {peer_timeout_s:g}s (durability.peer_timeout_s)"
            log.warning("%s unreachable for %.0fs, still trying%s", peer, gone_s, limit)
            while warn_after_s <= gone_s:
                warn_after_s *= 2
    return False
