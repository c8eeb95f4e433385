"""Per-replica statistics in the buffer: every replica's chunks and episodes reach whoever asks the
buffer (the trainer), counted once, and a chunk whose episode fields are bad stores nothing."""

from __future__ import annotations

import grpc
import pytest

from tests.helpers import serving_buffer, transitions
from titan_rl.buffer.sources import EPISODE_WINDOW, SourceStats
from titan_rl.clients.buffer import BufferClient, ChunkSender
from titan_rl.rpc import make_channel
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc


def test_statistics_are_kept_per_replica_and_over_all_of_them():
    stats = SourceStats()
    # replica, worker, env steps, records, policy version, episode returns and lengths
    stats.record(0, 0, 100, 100, 3, [10.0, 20.0], [10, 20], now=0.0)
    stats.record(1, 2, 50, 50, 5, [30.0], [30], now=1.0)
    stats.record(0, 1, 100, 100, 4, [], [], now=2.0)
    response = stats.response(now=2.0)
    assert [s.replica_id for s in response.sources] == [0, 1]
    zero, one = response.sources
    assert (zero.env_steps, zero.records, zero.chunks, zero.episodes, zero.workers) == (200, 200, 2, 2, 2)
    assert zero.mean_return == 15.0 and zero.policy_version == 3, "the oldest version any of its workers acts with"
    assert (one.episodes, one.mean_return, one.seconds_since_last_chunk) == (1, 30.0, 1.0)
    assert response.episodes == 3 and response.mean_return == 20.0 and response.window == 3
    assert response.env_steps_per_s == pytest.approx(150 / 2.0), "steps stored after the first chunk, over the time since it"
    stats.record(1, 2, 1, 1, 5, [1.0] * (EPISODE_WINDOW + 5), [1] * (EPISODE_WINDOW + 5), now=3.0)
    assert stats.response(now=3.0).window == EPISODE_WINDOW


def test_every_replicas_episodes_reach_the_buffers_sources_call_once():
    with serving_buffer() as (address, _):
        senders = [ChunkSender(address, max_in_flight=2) for _ in range(2)]
        for replica_id, sender in enumerate(senders):
            for i in range(3):
                episodes = {"episode_returns": [float(10 * replica_id + i)], "episode_lengths": [7], "replica_id": replica_id}
                assert sender.send(transitions(16, start=16 * i), replica_id * 4, i, 16, **episodes)
            assert sender.flush(10.0)
        client = BufferClient(address)
        response = client.sources()
        assert response is not None
        assert [(s.replica_id, s.env_steps, s.episodes, s.policy_version) for s in response.sources] == [(0, 48, 3, 2), (1, 48, 3, 2)]
        assert response.sources[1].mean_return == pytest.approx(11.0)
        for sender in senders:
            sender.close()
        client.close()


@pytest.mark.parametrize(
    ("fill", "named"),
    [
        (lambda c: (c.episode_returns.extend([float("nan")]), c.episode_lengths.extend([3])), "chunk.episode_returns"),
        (lambda c: (c.episode_returns.extend([1.0, 2.0]), c.episode_lengths.extend([3])), "chunk.episode_lengths"),
        (lambda c: (c.episode_returns.extend([1.0]), c.episode_lengths.extend([0])), "chunk.episode_lengths"),
        (lambda c: setattr(c, "replica_id", -1), "chunk.replica_id"),
    ],
)
def test_a_chunk_with_bad_episode_fields_is_refused_naming_the_field_and_stores_nothing(fill, named):
    from titan_rl import wire

    with serving_buffer() as (address, table):
        request = buffer_pb2.AddRequest(ack=True)
        wire.fill_chunk(request.chunk, transitions(8), worker_id=0, policy_version=0, env_steps=8)
        fill(request.chunk)
        channel = make_channel(address)
        with pytest.raises(grpc.RpcError) as raised:
            list(buffer_pb2_grpc.BufferServiceStub(channel).Add(iter([request]), timeout=10))
        channel.close()
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in raised.value.details()
        assert table.info().inserts_total == 0
        client = BufferClient(address)
        assert list(client.sources().sources) == []
        client.close()


def test_a_buffer_without_the_sources_call_is_named_once_and_answers_none(caplog):
    """An older buffer: the trainer goes on without episode statistics, saying why once."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(1))  # serves no service at all: every call is UNIMPLEMENTED
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = BufferClient(f"127.0.0.1:{port}")
    try:
        with caplog.at_level("WARNING", logger="titan_rl.clients.buffer"):
            assert client.sources() is None and client.sources() is None
        assert [r.getMessage() for r in caplog.records].count(
            f"buffer 127.0.0.1:{port} has no Sources call (an older version): no episode statistics"
        ) == 1
    finally:
        client.close()
        server.stop(None)
