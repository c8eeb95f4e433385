"""The buffer service over real gRPC on a free port."""

import time

import grpc
import numpy as np
import pytest

from tests.helpers import transitions
from titan_rl import wire
from titan_rl.buffer.client import BatchPrefetcher, BufferClient, ChunkSender
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc


def _add(stub, *chunks):
    """Send chunks on one Add stream; returns the acknowledgements."""
    return list(stub.Add(iter([buffer_pb2.AddRequest(chunk=c) for c in chunks]), timeout=5))


def test_add_acknowledges_each_chunk_and_info_counts_them(buffer_server):
    address, _ = buffer_server
    client = BufferClient(address)
    acks = _add(client.stub, wire.encode_chunk(transitions(10)), wire.encode_chunk(transitions(5)))
    assert [a.transitions_added for a in acks] == [10, 15]
    info = client.info()
    assert (info.size, info.capacity, info.inserts_total) == (15, 1000, 15)


def test_sampling_before_enough_data_is_failed_precondition(buffer_server):
    client = BufferClient(buffer_server[0])
    with pytest.raises(grpc.RpcError) as e:
        client.sample(batch_size=8)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fewer than batch_size=8" in e.value.details()


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda f: {**f, "obs": np.zeros((10, 3), np.float32), "next_obs": np.zeros((10, 3), np.float32)}, "chunk.obs"),
        (lambda f: {**f, "reward": np.zeros(9, np.float32)}, "chunk.reward"),
        (lambda f: {**f, "terminated": np.zeros(10, np.float32)}, "chunk.terminated"),
    ],
)
def test_malformed_insert_is_invalid_argument_naming_the_field_and_the_service_keeps_serving(buffer_server, mutate, field):
    address, _ = buffer_server
    client = BufferClient(address)
    _add(client.stub, wire.encode_chunk(transitions(10)))
    with pytest.raises(grpc.RpcError) as e:
        _add(client.stub, wire.encode_chunk(mutate(transitions(10))))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field)
    assert client.info().size == 10  # nothing of the bad chunk was stored
    _add(client.stub, wire.encode_chunk(transitions(10)))
    assert client.info().size == 20


def test_bytes_that_do_not_fill_the_shape_are_invalid_argument(buffer_server):
    client = BufferClient(buffer_server[0])
    chunk = wire.encode_chunk(transitions(10))
    chunk.action.data = chunk.action.data[:-3]
    with pytest.raises(grpc.RpcError) as e:
        _add(client.stub, chunk)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk.action" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(client.stub.Add(iter([buffer_pb2.AddRequest()]), timeout=5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk" in e.value.details()


def test_bad_sample_request_is_invalid_argument(buffer_server):
    stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(buffer_server[0]))
    with pytest.raises(grpc.RpcError) as e:
        stub.Sample(buffer_pb2.SampleRequest(batch_size=0), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch_size" in e.value.details()


def test_chunk_sender_and_prefetcher_move_data_end_to_end(buffer_server):
    address, replay = buffer_server
    sender = ChunkSender(address)
    for i in range(10):
        assert sender.send(transitions(32, start=32 * i), worker_id=1, policy_version=3)
    assert sender.flush(timeout_s=5)
    sender.close()
    assert replay.info().inserts_total == 320
    prefetcher = BatchPrefetcher(address, batch_size=16, batches_per_request=4, prefetch_requests=2)
    try:
        batches = [prefetcher.next(timeout_s=5) for _ in range(10)]
    finally:
        prefetcher.close()
    assert all(b["obs"].shape == (16, 4) for b in batches)
    assert prefetcher.inserts_total == 320
    for b in batches:
        np.testing.assert_array_equal(b["next_obs"], b["obs"] + 1)


def test_chunk_sender_surfaces_a_rejected_chunk(buffer_server):
    sender = ChunkSender(buffer_server[0])
    sender.send(transitions(8), 0, 0)
    sender.flush(5)
    sender.send({**transitions(8), "obs": np.zeros((8, 5), np.float32), "next_obs": np.zeros((8, 5), np.float32)}, 0, 0)
    from titan_rl.errors import TitanError

    with pytest.raises(TitanError, match="INVALID_ARGUMENT: chunk.obs"):
        for _ in range(50):
            sender.send(transitions(8), 0, 0)
            sender.flush(0.1)


def test_many_open_streams_do_not_starve_other_calls(buffer_server):
    """Each open stream holds a server thread: 40 idle Add streams (say 40 actors) must not block Info."""
    import queue

    address, _ = buffer_server
    channel = grpc.insecure_channel(address)
    stub = buffer_pb2_grpc.BufferServiceStub(channel)
    outboxes = [queue.Queue() for _ in range(40)]

    def requests(outbox):
        while (item := outbox.get()) is not None:
            yield item

    calls = [stub.Add(requests(q), timeout=20) for q in outboxes]
    try:
        for q in outboxes:
            q.put(buffer_pb2.AddRequest(chunk=wire.encode_chunk(transitions(1))))
        for call in calls:
            next(call)  # every stream is open and answered once
        assert BufferClient(address, timeout_s=2).info().inserts_total == 40
    finally:
        for q in outboxes:
            q.put(None)
        channel.close()


def test_chunk_sender_reconnects_when_the_buffer_comes_back(caplog):
    """A dead peer is retried with back-off and logged: the sender survives a buffer restart."""
    from tests.helpers import make_config
    from titan_rl.buffer.__main__ import start
    from titan_rl.launch import free_port

    port = free_port("127.0.0.1")
    cfg = make_config(f"buffer_server.port={port}", "train.min_buffer_size=64")
    server, _, replay = start(cfg)
    sender = ChunkSender(f"127.0.0.1:{port}")
    try:
        sender.send(transitions(8), 0, 0)
        assert sender.flush(5) and replay.info().size == 8
        replay.close()
        server.stop(grace=None).wait()
        server, _, replay = start(cfg)  # same port, empty buffer
        deadline = time.monotonic() + 20
        while replay.info().size == 0 and time.monotonic() < deadline:
            sender.send(transitions(8), 0, 0, keep_waiting=lambda: time.monotonic() < deadline)
            sender.flush(0.5)
        assert replay.info().size > 0
        assert "reconnecting" in caplog.text
    finally:
        sender.close(0)
        replay.close()
        server.stop(grace=None).wait()
