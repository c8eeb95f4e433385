"""Per-replica statistics in the buffer: every replica's chunks and episodes reach whoever asks the
buffer (the trainer), counted once, a chunk whose episode fields are bad stores nothing, and a
restarted buffer goes on from the statistics of its snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import pytest

from tests.helpers import REPO, make_config, serving_buffer, transitions
from titan_rl.auth import TOKEN_ENV
from titan_rl.buffer.sources import EPISODE_WINDOW, SourceStats
from titan_rl.clients.buffer import BufferClient, ChunkSender
from titan_rl.errors import TitanError
from titan_rl.launcher import free_ports
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


def add_chunk(address: str, sender_id: int, sequence: int, replica_id: int = 0, worker_id: int = 4) -> None:
    """One chunk of 8 records on a stream of its own, as `sender_id`'s `sequence`-th."""
    from titan_rl import wire

    request = buffer_pb2.AddRequest(ack=True)
    wire.fill_chunk(request.chunk, transitions(8), worker_id, policy_version=0, env_steps=8, replica_id=replica_id)
    request.chunk.sender_id, request.chunk.sequence = sender_id, sequence
    channel = make_channel(address)
    try:
        list(buffer_pb2_grpc.BufferServiceStub(channel).Add(iter([request]), timeout=10))
    finally:
        channel.close()


def test_a_restarted_worker_sends_through_its_new_stream():
    with serving_buffer() as (address, table):
        add_chunk(address, sender_id=1, sequence=1)
        add_chunk(address, sender_id=2, sequence=1)  # the same worker, restarted: a new sender
        add_chunk(address, sender_id=2, sequence=2)
        add_chunk(address, sender_id=3, sequence=1, replica_id=1)  # worker 4 of another replica
        assert table.info().inserts_total == 32


def test_two_replicas_started_with_one_replica_id_are_told_apart_and_refused_naming_it():
    """Their workers have the same ids and seeds: every episode reached the replay twice, and the two
    replicas' statistics were one. A worker's old sender that sends again after a new one did is
    the other replica's worker of the same id."""
    with serving_buffer() as (address, table):
        add_chunk(address, sender_id=1, sequence=1, replica_id=2)
        add_chunk(address, sender_id=2, sequence=1, replica_id=2)
        with pytest.raises(grpc.RpcError) as refused:
            add_chunk(address, sender_id=1, sequence=2, replica_id=2)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details().startswith(
            "chunk.replica_id: worker 4 of rollout replica 2 sends through two streams at once: "
            "are two rollout replicas started with rollout_server.replica_id=2?"
        )
        assert table.info().inserts_total == 16  # nothing of the refused chunk


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


def _counted(response: buffer_pb2.SourcesResponse) -> list:
    """What a snapshot keeps of a Sources answer: all but the rate and the time since each replica's last chunk."""
    per_replica = [
        (s.replica_id, s.env_steps, s.records, s.chunks, s.episodes, s.mean_return, s.mean_length, s.window, s.policy_version, s.workers)
        for s in response.sources
    ]
    return [per_replica, response.episodes, response.mean_return, response.mean_length, response.window]


def test_the_statistics_keep_a_bounded_number_of_replicas_and_workers_forgetting_the_longest_silent(monkeypatch):
    from titan_rl.buffer import sources

    monkeypatch.setattr(sources, "MAX_REPLICAS", 3)
    monkeypatch.setattr(sources, "MAX_WORKERS_PER_REPLICA", 2)
    stats = SourceStats()
    for replica_id, now in ((0, 5.0), (1, 1.0), (2, 3.0), (0, 6.0), (7, 7.0)):  # replica 1 has been silent longest
        stats.record(replica_id, 0, 1, 1, 0, [], [], now=now)
    for worker_id in (1, 2, 3):
        stats.record(7, worker_id, 1, 1, worker_id, [], [], now=8.0)
    response = stats.response(now=8.0)
    assert [s.replica_id for s in response.sources] == [0, 2, 7]
    assert (response.sources[2].workers, response.sources[2].policy_version) == (2, 2), "workers 2 and 3 kept"
    assert sum(s.env_steps for s in response.sources) < 8 and stats.state_dict()["env_steps"] == 8, "the totals count everything"


def test_statistics_round_trip_through_json_and_restart_their_clocks():
    stats = SourceStats()
    stats.record(0, 0, 100, 90, 3, [10.0, 20.0], [10, 20], now=0.0)
    stats.record(2, 1, 50, 50, 5, [1.5] * (EPISODE_WINDOW + 3), [7] * (EPISODE_WINDOW + 3), now=1.0)
    restored = SourceStats()
    restored.load_state_dict(json.loads(json.dumps(stats.state_dict())), now=50.0)
    response = restored.response(now=51.0)
    assert _counted(response) == _counted(stats.response(now=1.0))
    assert [s.seconds_since_last_chunk for s in response.sources] == [1.0, 1.0], "heard from at the restore"
    assert response.env_steps_per_s == 0.0, "a rate is measured afresh"
    restored.record(0, 0, 10, 10, 4, [30.0], [30], now=52.0)
    assert (restored.response(now=52.0).sources[0].env_steps, restored.episodes) == (110, 2 + EPISODE_WINDOW + 3 + 1)


def test_a_worker_gone_for_good_stops_holding_its_replicas_acting_version_back():
    """After a restart with fewer workers (or a restore), the workers that no longer send kept the
    replica's acting version, and so the trainer's chart and lag, at their last version forever."""
    from titan_rl.buffer.sources import LIVE_WORKER_S

    stats = SourceStats()
    for worker_id in (0, 1, 2):
        stats.record(0, worker_id, 1, 1, 3, [], [], now=0.0)
    restored = SourceStats()
    restored.load_state_dict(stats.state_dict(), now=10.0)
    assert (restored.response(now=10.0).sources[0].policy_version, restored.response(now=10.0).sources[0].workers) == (3, 3)
    restored.record(0, 0, 1, 1, 9, [], [], now=11.0)  # the replica came back with one worker
    assert (restored.response(now=11.0).sources[0].policy_version, restored.response(now=11.0).sources[0].workers) == (9, 1)
    stats.record(0, 0, 1, 1, 7, [], [], now=LIVE_WORKER_S + 1)  # workers 1 and 2 fell silent at 0
    assert (stats.response(now=LIVE_WORKER_S + 1).sources[0].policy_version, stats.response(now=LIVE_WORKER_S + 1).sources[0].workers) == (
        7,
        1,
    )
    stats.record(0, 1, 1, 1, 8, [], [], now=LIVE_WORKER_S + 2)
    assert stats.response(now=LIVE_WORKER_S + 2).sources[0].policy_version == 7, "the oldest version any acting worker acts with"


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.pop("episodes"),
        lambda s: s.update(env_steps=-1),
        lambda s: s.update(returns=[1.0, "1"]),
        lambda s: s.update(returns=[float("nan")]),
        lambda s: s["replicas"]["0"].update(worker_versions={}),
        lambda s: s["replicas"]["0"].update(chunks=1.5),
        lambda s: s.update(replicas={"zero": s["replicas"]["0"]}),
        lambda s: s.update(replicas=[]),
        lambda s: s.update(env_steps=2**64),  # taken, then every Sources answer failed
        lambda s: s.update(replicas={"4294967296": s["replicas"]["0"]}),
        lambda s: s["replicas"]["0"].update(worker_versions={"0": 2**64}),
    ],
)
def test_a_damaged_state_is_refused_and_changes_nothing(damage):
    source = SourceStats()
    source.record(0, 0, 100, 90, 3, [10.0], [10], now=0.0)
    state = json.loads(json.dumps(source.state_dict()))
    damage(state)
    stats = SourceStats()
    stats.record(1, 0, 8, 8, 1, [2.0], [2], now=0.0)
    before = _counted(stats.response(now=0.0))
    with pytest.raises(TitanError, match="not the replicas' statistics"):
        stats.load_state_dict(state)
    assert _counted(stats.response(now=0.0)) == before


def test_a_snapshot_with_damaged_statistics_stops_the_buffer_naming_the_file(tmp_path):
    from titan_rl.buffer.process import SOURCES_KEY, serve
    from titan_rl.buffer.service import tables_for
    from titan_rl.buffer.snapshot import write_snapshot
    from titan_rl.registry import build_algorithm

    cfg = make_config("buffer_server.port=0", f"durability.snapshot_path={tmp_path / 'snapshot.npz'}")
    tables = tables_for(build_algorithm(cfg), cfg.seed)
    write_snapshot(cfg.snapshot_path(), {name: t.state_dict() for name, t in tables.items()}, {SOURCES_KEY: {"episodes": -1}})
    with pytest.raises(TitanError, match=f"{tmp_path / 'snapshot.npz'}: not the replicas' statistics"):
        serve(cfg)


def _start_buffer(tmp_path, port: int, attempt: int) -> subprocess.Popen:
    """`python -m titan_rl.buffer` keeping its snapshot in the run folder under `tmp_path`."""
    return subprocess.Popen(
        [sys.executable, "-m", "titan_rl.buffer", "--config", "config/cartpole.yaml", f"buffer_server.port={port}",
         f"logging.run_dir={tmp_path}", "logging.run_name=restart", "durability.snapshot_interval_s=0"],
        cwd=REPO, stdout=open(tmp_path / f"buffer.{attempt}.log", "w"), stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != TOKEN_ENV},
    )  # fmt: skip


def _sources_once_up(address: str, timeout_s: float = 60.0) -> buffer_pb2.SourcesResponse:
    client = BufferClient(address, timeout_s=2.0)
    deadline = time.monotonic() + timeout_s
    try:
        while (response := client.sources()) is None:
            assert time.monotonic() < deadline, f"the buffer at {address} did not answer in {timeout_s:.0f}s"
            time.sleep(0.2)
        return response
    finally:
        client.close()


def test_a_restarted_buffer_goes_on_from_the_statistics_of_its_snapshot(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    (port,) = free_ports(["127.0.0.1"])
    address = f"127.0.0.1:{port}"
    buffer = _start_buffer(tmp_path, port, 1)
    try:
        _sources_once_up(address)
        sender = ChunkSender(address, max_in_flight=2)
        for replica_id in (0, 3):
            for i in range(3):
                episodes = {"episode_returns": [float(10 * replica_id + i)], "episode_lengths": [9 + i], "replica_id": replica_id}
                assert sender.send(transitions(16, start=16 * i), replica_id, i, 16, **episodes)
        assert sender.flush(10.0)
        sender.close()
        before = _sources_once_up(address)
        assert before.episodes == 6
        buffer.terminate()  # a clean stop: the last snapshot is written on the way out
        assert buffer.wait(30) == 0
        buffer = _start_buffer(tmp_path, port, 2)
        after = _sources_once_up(address)
        assert _counted(after) == _counted(before)
        log = (tmp_path / "buffer.2.log").read_text()
        assert "and 6 episodes from" in log, log
    finally:
        buffer.kill()
        buffer.wait()
