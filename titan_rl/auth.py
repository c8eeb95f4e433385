"""A shared token on every RPC but health: strangers on the network cannot stop a run or write to it.

The token comes from the environment (`TITAN_RL_TOKEN`) or from `security.token` in the YAML
(the environment wins). With none set, servers accept every call, as before. `bash run.sh`
makes a fresh random token per run and hands it to its three services through the environment,
never on a command line. Clients send it as `authorization: Bearer <token>` metadata; servers
compare it in constant time and answer a call without it `UNAUTHENTICATED`.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable

import grpc

from titan_rl.config import TOKEN, TOKEN_RULE
from titan_rl.errors import ConfigError
from titan_rl.interceptors import metadata_value, refusing_handler

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


class TokenServerInterceptor(grpc.ServerInterceptor):
    """Rejects every call whose `authorization` metadata is not `Bearer <token>`, health checks aside."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata: tuple[tuple[str, str | bytes], ...]) -> bool:
        value = metadata_value(metadata, "authorization")
        if value is None:
            return False
        return hmac.compare_digest(value.encode() if isinstance(value, str) else value, self._expected)

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        return refusing_handler(
            handler, grpc.StatusCode.UNAUTHENTICATED, f"{handler_call_details.method}: a missing or wrong token (set {TOKEN_ENV})"
        )


def token_header(token: str) -> tuple[str, str]:
    """The metadata that carries `token` on a call."""
    return ("authorization", f"Bearer {token}")
