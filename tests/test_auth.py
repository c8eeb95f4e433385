"""Locked doors: with a token, every RPC but health needs it (titan_rl.auth), on real servers."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import make_config, transitions
from titan_rl import wire
from titan_rl.auth import TOKEN_ENV
from titan_rl.clients.buffer import BufferClient, ChunkSender
from titan_rl.rpc import make_server
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc, trainer_pb2, trainer_pb2_grpc


@pytest.fixture
def locked_buffer(monkeypatch):
    """A real buffer service started with a token; yields its address."""
    from titan_rl.buffer.process import start

    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    server, port, tables = start(make_config("buffer_server.port=0", "train.min_buffer_size=64"))
    yield f"127.0.0.1:{port}"
    for table in tables.values():
        table.close()
    server.stop(grace=None).wait()


def stranger(address: str, token: str | None = None) -> buffer_pb2_grpc.BufferServiceStub:
    """A client built by hand, sending `token` (or nothing)."""
    channel = grpc.insecure_channel(address)
    if token is not None:
        from titan_rl.auth import token_header
        from titan_rl.interceptors import HeadersClientInterceptor

        channel = grpc.intercept_channel(channel, HeadersClientInterceptor([token_header(token)]))
    return buffer_pb2_grpc.BufferServiceStub(channel)


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_calls_without_the_token_are_unauthenticated_and_change_nothing(locked_buffer, token):
    stub = stranger(locked_buffer, token)
    calls = {
        "Info": lambda: stub.Info(buffer_pb2.InfoRequest(), timeout=5),
        "Add": lambda: list(stub.Add(iter([buffer_pb2.AddRequest(chunk=wire.encode_chunk(transitions(5)), ack=True)]), timeout=5)),
        "SampleStream": lambda: next(stub.SampleStream(iter([buffer_pb2.SampleStreamRequest(batch_size=1)]), timeout=5)),
        "UpdatePriorities": lambda: stub.UpdatePriorities(buffer_pb2.UpdatePrioritiesRequest(), timeout=5),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert TOKEN_ENV in e.value.details(), name
    assert BufferClient(locked_buffer).info().inserts_total == 0  # this process holds the token: its clients get in


def test_the_right_token_gets_in_and_health_needs_none(locked_buffer):
    sender = ChunkSender(locked_buffer)  # made in a process whose environment holds the token
    assert sender.send(transitions(7), worker_id=0, policy_version=0) and sender.flush(5.0)
    sender.close()
    assert stranger(locked_buffer, "s3cret").Info(buffer_pb2.InfoRequest(), timeout=5).inserts_total == 7
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(locked_buffer))
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_a_stranger_cannot_stop_the_trainer(monkeypatch):
    from titan_rl.trainer.service import TrainerServicer

    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    stopped = []

    class Loop:
        def stop(self) -> None:
            stopped.append(True)

    server, port, _ = make_server("127.0.0.1", 0)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(Loop(), None), server)
    server.start()
    try:
        stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with pytest.raises(grpc.RpcError) as e:
            stub.Stop(trainer_pb2.StopRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and not stopped
    finally:
        server.stop(grace=None).wait()


def test_a_token_in_the_yaml_is_used_when_the_environment_names_none(monkeypatch):
    import os

    from titan_rl.service import parse_service_args

    monkeypatch.setenv(TOKEN_ENV, "")  # so that monkeypatch restores the variable's absence after use_token sets it
    monkeypatch.delenv(TOKEN_ENV)
    parse_service_args("buffer", "buffer_server", ["--config", "config/cartpole.yaml", "security.token=from-yaml"])
    assert os.environ[TOKEN_ENV] == "from-yaml"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    parse_service_args("buffer", "buffer_server", ["--config", "config/cartpole.yaml", "security.token=from-yaml"])
    assert os.environ[TOKEN_ENV] == "from-env"
