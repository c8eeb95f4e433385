"""A shared token on every RPC but health: strangers on the network cannot stop a run or write to it.

The token comes from the environment (`TITAN_RL_TOKEN`) or from `security.token` in the YAML
(the environment wins). With none set, servers accept every call, as before. `bash run.sh`
makes a fresh random token per run and hands it to its three services through the environment,
never on a command line. Clients send it as `authorization: Bearer <token>` metadata; servers
compare it in constant time and answer a call without it `UNAUTHENTICATED`.
"""

from __future__ import annotations

import collections
import hmac
import os
from collections.abc import Callable
from typing import Any

import grpc

from titan_rl.config import TOKEN, TOKEN_RULE
from titan_rl.errors import ConfigError

TOKEN_ENV = "TITAN_RL_TOKEN"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
"""Probes (Kubernetes, the launcher) check health without a token: it says nothing worth hiding."""


def current_token() -> str:
    return os.environ.get(TOKEN_ENV, "")


def check_token_env() -> None:
    """ConfigError unless $TITAN_RL_TOKEN, where set, is a token that gRPC metadata can carry."""
    token = current_token()
    if token and not TOKEN.fullmatch(token):
        raise ConfigError(f"${TOKEN_ENV} {TOKEN_RULE}")


def use_token(token: str) -> None:
    """Make `token` this process's (and its children's) token, unless the environment already names one."""
    if token and not current_token():
        os.environ[TOKEN_ENV] = token


def _deny(details: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    return deny


class TokenServerInterceptor(grpc.ServerInterceptor):
    """Rejects every call whose `authorization` metadata is not `Bearer <token>`, health checks aside."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata: tuple[tuple[str, str | bytes], ...]) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        deny = _deny(f"{handler_call_details.method}: a missing or wrong token (set {TOKEN_ENV})")
        codecs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, **codecs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, **codecs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, **codecs)
        return grpc.stream_stream_rpc_method_handler(deny, **codecs)


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class TokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
