"""The buffer service over real gRPC on a free port."""

import contextlib
import logging
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from tests.helpers import make_config, make_config_from, transitions
from titan_rl import wire
from titan_rl.adders import transition_spec
from titan_rl.algorithm import TableSpec
from titan_rl.buffer.service import BufferServicer
from titan_rl.buffer.table import Table
from titan_rl.clients.buffer import BatchPrefetcher, BufferClient, ChunkSender, PriorityUpdater, Sample, decode_sample
from titan_rl.errors import TitanError
from titan_rl.rpc import make_server
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc, common_pb2

SPEC = transition_spec((4,), np.float32)  # DQN's record on CartPole: what transitions() holds


def _add(stub, *chunks, table: str = ""):
    """Send chunks on one Add stream, each asking for an ack; returns the acknowledgements."""
    return list(stub.Add(iter([buffer_pb2.AddRequest(chunk=c, ack=True, table=table) for c in chunks]), timeout=5))


def _table(kind: str, capacity: int = 1000, **spec) -> Table:
    """A table of `transitions()` records; a replay table's rate limiter never holds anyone back unless told."""
    if kind != "fifo":
        spec.setdefault("slack_items", 1_000_000)
    return Table(TableSpec(kind, capacity_items=capacity, **spec), SPEC, seed=0)


@contextlib.contextmanager
def _serving(servicer: BufferServicer, port: int = 0) -> Iterator[str]:
    """`servicer` on a real gRPC server on 127.0.0.1:`port` (0: a free one); yields its address."""
    server, port, _ = make_server("127.0.0.1", port)
    buffer_pb2_grpc.add_BufferServiceServicer_to_server(servicer, server)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for table in servicer.tables.values():
            table.close()
        server.stop(None).wait()


def _obs0(sample: Sample) -> list[int]:
    """The item number each row was inserted with (transitions() counts it up in obs[:, 0])."""
    return sample.fields["obs"][:, 0].astype(int).tolist()


def test_add_acknowledges_each_chunk_that_asks_and_info_counts_them(buffer_server):
    address, _ = buffer_server
    client = BufferClient(address)
    acks = _add(client.stub, wire.encode_chunk(transitions(10)), wire.encode_chunk(transitions(5)))
    assert [a.items_added for a in acks] == [10, 15]
    info = client.info()
    assert (info.size, info.capacity, info.inserts_total) == (15, 1000, 15)


def test_add_answers_only_requests_that_ask_and_an_ack_alone_answers_for_all_before_it(buffer_server):
    address, _ = buffer_server
    client = BufferClient(address)
    requests = [
        buffer_pb2.AddRequest(chunk=wire.encode_chunk(transitions(10))),
        buffer_pb2.AddRequest(chunk=wire.encode_chunk(transitions(5)), ack=True),
        buffer_pb2.AddRequest(chunk=wire.encode_chunk(transitions(3))),
        buffer_pb2.AddRequest(ack=True),
    ]
    acks = list(client.stub.Add(iter(requests), timeout=5))
    assert [a.items_added for a in acks] == [15, 18]
    assert client.info().size == 18


def test_sampling_before_enough_data_is_failed_precondition(buffer_server):
    client = BufferClient(buffer_server[0])
    with pytest.raises(grpc.RpcError) as e:
        client.sample(batch_size=8)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fewer than batch_size=8" in e.value.details()


def _without_field(name: str):
    def mutate(chunk):
        kept = [f for f in chunk.records.layout.fields if f.name != name]
        del chunk.records.layout.fields[:]
        chunk.records.layout.fields.extend(kept)
        return chunk

    return mutate


def _with_field(**field):
    def mutate(chunk):
        chunk.records.layout.fields.add(**field)
        return chunk

    return mutate


def _field_set(name: str, **values):
    def mutate(chunk):
        field = next(f for f in chunk.records.layout.fields if f.name == name)
        for key, value in values.items():
            if key == "shape":
                field.shape[:] = value
            else:
                setattr(field, key, value)
        return chunk

    return mutate


def _numbered(chunk: common_pb2.RecordChunk, sender_id: int, sequence: int) -> common_pb2.RecordChunk:
    """A chunk numbered by a sender; one numbered below 1 was taken for a repeat and dropped without a word."""
    chunk.sender_id, chunk.sequence = sender_id, sequence
    return chunk


@pytest.mark.parametrize(
    ("chunk", "field"),
    [
        (
            lambda: wire.encode_chunk({**transitions(10), "obs": np.zeros((10, 3), np.float32), "next_obs": np.zeros((10, 3), np.float32)}),
            "chunk.records.obs: got rows of shape (3,)",
        ),
        (
            lambda: wire.encode_chunk({**transitions(10), "terminated": np.zeros(10, np.float32)}),
            "chunk.records.terminated: got rows of shape () float32, the table stores () bool",
        ),
        (lambda: _without_field("reward")(wire.encode_chunk(transitions(10))), "chunk.records.reward: missing"),
        (lambda: _field_set("action", offset=48)(wire.encode_chunk(transitions(10))), "chunk.records.action: 8 bytes at offset 48"),
        (lambda: _field_set("obs", dtype="object")(wire.encode_chunk(transitions(10))), "chunk.records.obs: unknown dtype"),
        (lambda: _field_set("obs", shape=[-4])(wire.encode_chunk(transitions(10))), "chunk.records.obs: shape (-4,) needs"),
        (
            lambda: _with_field(name="junk", dtype="uint8", shape=[1] * 70, offset=0)(wire.encode_chunk(transitions(10))),
            "chunk.records.junk: shape (1, 1, 1",
        ),
        (
            lambda: _with_field(name="junk", dtype="uint8", shape=[0, 2**40, 2**40], offset=0)(wire.encode_chunk(transitions(10))),
            "chunk.records.junk: shape (0, 1099511627776, 1099511627776) of uint8 cannot fit",
        ),
        (lambda: _field_set("reward", offset=0)(wire.encode_chunk(transitions(10))), "chunk.records.action: overlaps reward"),
        (
            lambda: wire.encode_chunk({**transitions(10), "log_prob": np.zeros(10, np.float32)}),  # an IMPALA actor's field
            "chunk.records.log_prob: is not in the table's signature",
        ),
        (lambda: wire.encode_chunk(transitions(10), env_steps=0), "chunk.env_steps: must be > 0 for 10 records"),
        (lambda: wire.encode_chunk(transitions(10), env_steps=-3), "chunk.env_steps: must be > 0 for 10 records"),
        (lambda: _numbered(wire.encode_chunk(transitions(10)), 8, 0), "chunk.sequence: must be >= 1 with a sender_id, got 0"),
        (lambda: _numbered(wire.encode_chunk(transitions(10)), 9, -5), "chunk.sequence: must be >= 1 with a sender_id, got -5"),
    ],
)
def test_malformed_insert_is_invalid_argument_naming_the_field_and_the_service_keeps_serving(buffer_server, chunk, field):
    address, _ = buffer_server
    client = BufferClient(address)
    _add(client.stub, wire.encode_chunk(transitions(10)))
    with pytest.raises(grpc.RpcError) as e:
        _add(client.stub, chunk())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field)
    assert client.info().size == 10  # nothing of the bad chunk was stored
    _add(client.stub, wire.encode_chunk(transitions(10)))
    assert client.info().size == 20


def test_bytes_that_do_not_fill_the_rows_are_invalid_argument(buffer_server):
    client = BufferClient(buffer_server[0])
    chunk = wire.encode_chunk(transitions(10))
    chunk.records.data = chunk.records.data[:-3]
    with pytest.raises(grpc.RpcError) as e:
        _add(client.stub, chunk)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk.records.data" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(client.stub.Add(iter([buffer_pb2.AddRequest()]), timeout=5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk" in e.value.details()


def test_bad_sample_request_is_invalid_argument(buffer_server):
    stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(buffer_server[0]))
    with pytest.raises(grpc.RpcError) as e:
        stub.Sample(buffer_pb2.SampleRequest(batch_size=0), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch_size" in e.value.details()


def test_chunk_sender_and_prefetcher_move_data_end_to_end(buffer_server):
    address, table = buffer_server
    sender = ChunkSender(address)
    for i in range(10):
        assert sender.send(transitions(32, start=32 * i), worker_id=1, policy_version=3, env_steps=40)
    assert sender.flush(timeout_s=5)
    sender.close()
    assert (table.info().inserts_total, table.info().env_steps_total) == (320, 400)
    prefetcher = BatchPrefetcher(address, batch_size=16, batches_per_request=4, prefetch_requests=2)
    try:
        batches = [prefetcher.next(timeout_s=5) for _ in range(10)]
    finally:
        prefetcher.close()
    assert all(isinstance(b, Sample) and len(b) == 16 and b.fields["obs"].shape == (16, 4) for b in batches)
    assert prefetcher.env_steps_total == 400 and all(b.env_steps_total == 400 for b in batches)
    for b in batches:
        np.testing.assert_array_equal(b.fields["next_obs"], b.fields["obs"] + 1)
        assert b.keys is None and b.weights is None  # a uniform table sends neither: no one would read them


class _AckRecorder(BufferServicer):
    """The real servicer, noting which Add requests asked for an ack (True, False; None: no chunk)."""

    def __init__(self, tables):
        super().__init__(tables)
        self.asked: list[bool | None] = []

    def Add(self, request_iterator, context):
        def noted():
            for request in request_iterator:
                self.asked.append(request.ack if request.HasField("chunk") else None)
                yield request

        yield from super().Add(noted(), context)


def test_chunk_sender_asks_for_an_ack_every_half_window_and_flush_asks_for_the_rest():
    servicer = _AckRecorder({"default": _table("uniform")})
    with _serving(servicer) as address:
        sender = ChunkSender(address, max_in_flight=4)
        deadline = time.monotonic() + 10
        try:
            for i in range(7):
                assert sender.send(transitions(8, start=8 * i), 0, 0, keep_waiting=lambda: time.monotonic() < deadline)
            assert sender.flush(5)
            assert sender.chunks_acked == 7 and servicer.tables["default"].info().size == 56
            assert servicer.asked == [False, True, False, True, False, True, False, None]
        finally:
            sender.close()


def test_chunk_sender_stops_at_its_window_while_the_buffer_holds_inserts_back_and_redelivers_after_a_restart():
    """The rate limiter lets 2 chunks of 8 in, then holds the third: 4 chunks may be unacknowledged, not 5.
    The buffer then restarts with those 4 unacknowledged: they reach the new one, before the 5 sent after."""
    table = _table("uniform", samples_per_insert=1, min_size_to_sample=0, slack_items=8)
    sender = None
    try:
        with _serving(BufferServicer({"default": table})) as address:
            sender = ChunkSender(address, max_in_flight=4)
            deadline = time.monotonic() + 10
            for i in range(6):
                assert sender.send(transitions(8, start=8 * i), 0, 0, keep_waiting=lambda: time.monotonic() < deadline)
            deadline = time.monotonic() + 1
            assert not sender.send(transitions(8), 0, 0, keep_waiting=lambda: time.monotonic() < deadline)
            assert sender.chunks_acked == 2 and table.info().size == 16
        restarted = _table("uniform")
        with _serving(BufferServicer({"default": restarted}), port=int(address.rpartition(":")[2])):
            deadline = time.monotonic() + 20
            for _ in range(5):
                assert sender.send(transitions(8), 0, 0, keep_waiting=lambda: time.monotonic() < deadline)
            assert sender.flush(10) and sender.chunks_acked == 2 + 4 + 5 and restarted.info().size == (4 + 5) * 8
            first = restarted.layout.views(restarted.storage.gather(np.arange(8)))["obs"][:, 0]
            assert first.astype(int).tolist() == list(range(16, 24)), "the oldest unacknowledged chunk came first"
    finally:
        if sender is not None:
            sender.close(flush_timeout_s=0)


class _AcksEveryRequest(BufferServicer):
    """A buffer from before AddRequest.ack: it answers every request."""

    def Add(self, request_iterator, context):
        for request in request_iterator:
            self.tables["default"].insert_records(*wire.decode_chunk(request.chunk), env_steps=request.chunk.env_steps)
            yield buffer_pb2.AddResponse()


def test_chunk_sender_reports_acks_it_did_not_ask_for_instead_of_miscounting():
    with _serving(_AcksEveryRequest({"default": _table("uniform")})) as address:
        sender = ChunkSender(address, max_in_flight=4)
        try:
            with pytest.raises(TitanError, match="did not ask"):
                for _ in range(50):
                    sender.send(transitions(8), 0, 0)
                    time.sleep(0.01)
        finally:
            sender.close(flush_timeout_s=0)


def test_chunk_sender_surfaces_a_rejected_chunk(buffer_server):
    sender = ChunkSender(buffer_server[0])
    sender.send(transitions(8), 0, 0)
    sender.flush(5)
    sender.send({**transitions(8), "obs": np.zeros((8, 5), np.float32), "next_obs": np.zeros((8, 5), np.float32)}, 0, 0)

    with pytest.raises(TitanError, match="INVALID_ARGUMENT: chunk.records.obs"):
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
            q.put(buffer_pb2.AddRequest(chunk=wire.encode_chunk(transitions(1)), ack=True))
        for call in calls:
            next(call)  # every stream is open and answered once
        assert BufferClient(address, timeout_s=2).info().inserts_total == 40
    finally:
        for q in outboxes:
            q.put(None)
        channel.close()


def test_chunk_sender_reconnects_when_the_buffer_comes_back(caplog):
    """A dead peer is retried with back-off and logged: the sender survives a buffer restart."""
    from titan_rl.buffer.process import start
    from titan_rl.launcher import free_port

    port = free_port("127.0.0.1")
    cfg = make_config(f"buffer_server.port={port}", "train.min_buffer_size=64")
    server, _, tables = start(cfg)
    (table,) = tables.values()
    sender = ChunkSender(f"127.0.0.1:{port}")
    try:
        sender.send(transitions(8), 0, 0)
        assert sender.flush(5) and table.info().size == 8
        table.close()
        server.stop(grace=None).wait()
        server, _, tables = start(cfg)  # same port, empty buffer
        (table,) = tables.values()
        deadline = time.monotonic() + 20
        while table.info().size == 0 and time.monotonic() < deadline:
            sender.send(transitions(8), 0, 0, keep_waiting=lambda: time.monotonic() < deadline)
            sender.flush(0.5)
        assert table.info().size > 0
        assert "reconnecting" in caplog.text
        acked = sender.chunks_acked
        for _ in range(5):
            sender.send(transitions(8), 0, 0)
        assert sender.flush(5) and sender.chunks_acked == acked + 5  # the counts of the dead stream are gone
    finally:
        sender.close(0)
        table.close()
        server.stop(grace=None).wait()


def test_a_bad_credit_on_sample_stream_is_invalid_argument_naming_the_field(buffer_server):
    address, table = buffer_server
    table.insert_fields(transitions(100))
    stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(address))
    credits = [buffer_pb2.SampleStreamRequest(batch_size=8), buffer_pb2.SampleStreamRequest(batch_size=8, num_batches=-1)]
    replies = stub.SampleStream(iter(credits), timeout=5)
    assert next(replies).sample.records.rows == 8
    with pytest.raises(grpc.RpcError) as e:
        next(replies)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_batches" in e.value.details()


def test_cancelled_sample_streams_stop_their_producer_threads(buffer_server):
    """Streams waiting on an empty buffer, then cancelled, must not leave a thread behind each."""
    import threading

    def producers() -> int:
        return sum(t.name == "sample-producer" for t in threading.enumerate())

    address, table = buffer_server
    channel = grpc.insecure_channel(address)
    stub = buffer_pb2_grpc.BufferServiceStub(channel)
    calls = [stub.SampleStream(iter([buffer_pb2.SampleStreamRequest(batch_size=8)]), timeout=10) for _ in range(5)]
    deadline = time.monotonic() + 5
    while producers() < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert producers() == 5  # every handler is waiting for data
    for call in calls:
        call.cancel()
    while producers() and time.monotonic() < deadline + 5:
        time.sleep(0.05)
    assert producers() == 0
    table.insert_fields(transitions(100))
    replies = stub.SampleStream(iter([buffer_pb2.SampleStreamRequest(batch_size=8)]), timeout=5)
    assert next(replies).sample.records.rows == 8
    channel.close()


def test_prefetcher_reports_an_unreadable_batch_instead_of_waiting_forever():
    """A peer speaking the protocol wrongly (here: a layout whose field overruns the record) is an error for the learner."""
    from concurrent import futures

    from titan_rl.launcher import free_port

    def bad_sample_stream(requests, context):
        for _ in requests:
            reply = buffer_pb2.SampleStreamResponse()
            reply.sample.records.rows = 8
            reply.sample.records.data = bytes(8 * 4)
            reply.sample.records.layout.record_size = 4
            reply.sample.records.layout.fields.add(name="obs", dtype="float32", shape=[4], offset=0)
            yield reply

    port = free_port("127.0.0.1")
    server = grpc.server(futures.ThreadPoolExecutor(4))
    handler = grpc.stream_stream_rpc_method_handler(
        bad_sample_stream, buffer_pb2.SampleStreamRequest.FromString, buffer_pb2.SampleStreamResponse.SerializeToString
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("titan_rl.v1.BufferService", {"SampleStream": handler})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    prefetcher = BatchPrefetcher(f"127.0.0.1:{port}", batch_size=8)
    try:
        with pytest.raises(TitanError, match=r"unreadable batch: obs: shape \(4,\) of float32 cannot fit a 4-byte record"):
            for _ in range(50):
                prefetcher.next(timeout_s=0.1)
    finally:
        prefetcher.close()
        server.stop(None)


def test_prefetcher_reports_any_failure_of_its_thread_instead_of_waiting_forever(buffer_server, monkeypatch):
    address, table = buffer_server
    table.insert_fields(transitions(100))

    def broken(batch, required=()):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(wire, "decode_records", broken)
    prefetcher = BatchPrefetcher(address, batch_size=8)
    try:
        with pytest.raises(TitanError, match="decoder bug"):
            for _ in range(50):
                prefetcher.next(timeout_s=0.1)
    finally:
        prefetcher.close()


def test_a_sample_too_large_for_one_message_is_invalid_argument_before_anything_is_allocated(buffer_server):
    address, table = buffer_server
    table.insert_fields(transitions(100))
    stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(address))
    huge = {"batch_size": 8, "num_batches": 2**30}
    with pytest.raises(grpc.RpcError) as e:
        stub.Sample(buffer_pb2.SampleRequest(**huge), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch_size * num_batches" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        next(stub.SampleStream(iter([buffer_pb2.SampleStreamRequest(**huge)]), timeout=5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch_size * num_batches" in e.value.details()
    assert BufferClient(address).sample(batch_size=8).fields["obs"].shape == (8, 4)  # still serving


# ---- env steps, tables by name, Info -----------------------------------------------------------------------


def test_env_steps_travel_with_chunks_and_come_back_with_samples(buffer_server):
    address, _ = buffer_server
    client = BufferClient(address)
    _add(client.stub, wire.encode_chunk(transitions(32), env_steps=96), wire.encode_chunk(transitions(32)))  # default: one per row
    info = client.info()
    assert (info.inserts_total, info.env_steps_total) == (64, 128)
    assert client.sample(batch_size=8).env_steps_total == 128


def test_info_names_the_kind_and_the_signature_of_each_table(buffer_server):
    info = BufferClient(buffer_server[0]).info()
    assert (info.table, info.kind, info.capacity) == ("default", "uniform", 1000)
    fields = {f.name: (f.dtype, tuple(f.shape)) for f in info.signature.fields}
    assert fields == {name: (dtype.name, shape) for name, (shape, dtype) in SPEC.items()}
    assert info.signature.record_size == buffer_server[1].layout.record_size


@pytest.mark.parametrize(
    ("config", "overrides", "kind", "capacity", "field", "shape"),
    [
        ("config/cartpole.yaml", ["algorithm.config.replay=prioritized"], "prioritized", 1000, "next_obs", (4,)),
        ("config/cartpole_impala.yaml", [], "fifo", 32, "log_prob", (20,)),  # 20-step segments, and their log-probs
    ],
)
def test_the_algorithm_in_the_config_decides_the_table_kind_and_signature(config, overrides, kind, capacity, field, shape):
    from titan_rl.buffer.process import start

    cfg = make_config_from(config, "buffer_server.port=0", "buffer_server.capacity_items=1000", "train.min_buffer_size=64", *overrides)
    server, port, tables = start(cfg)
    try:
        info = BufferClient(f"127.0.0.1:{port}").info()
        assert (info.kind, info.capacity, info.size) == (kind, capacity, 0)
        fields = {f.name: tuple(f.shape) for f in info.signature.fields}
        assert fields[field] == shape and set(fields) == set(tables[info.table].layout.slots)
    finally:
        for t in tables.values():
            t.close()
        server.stop(None).wait()


def _calls(stub):
    """Every RPC, as a zero-argument call on table "nope"."""
    keys = buffer_pb2.UpdatePrioritiesRequest(table="nope")
    wire.fill(keys.keys, np.array([0], np.int64))
    wire.fill(keys.priorities, np.array([1.0], np.float32))
    return {
        "Add": lambda: _add(stub, wire.encode_chunk(transitions(4)), table="nope"),
        "Sample": lambda: stub.Sample(buffer_pb2.SampleRequest(batch_size=4, table="nope"), timeout=5),
        "Info": lambda: stub.Info(buffer_pb2.InfoRequest(table="nope"), timeout=5),
        "UpdatePriorities": lambda: stub.UpdatePriorities(keys, timeout=5),
    }


@pytest.mark.parametrize("rpc", ["Add", "Sample", "Info", "UpdatePriorities"])
def test_an_unknown_table_is_not_found_naming_the_field(buffer_server, rpc):
    address, table = buffer_server
    table.insert_fields(transitions(8))
    stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError) as e:
        _calls(stub)[rpc]()
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details().startswith("table: no table 'nope' (tables: default)")
    assert table.info().inserts_total == 8


def test_an_unknown_table_on_sample_stream_is_refused_naming_the_field(buffer_server):
    address, table = buffer_server
    table.insert_fields(transitions(8))
    stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError) as e:
        next(stub.SampleStream(iter([buffer_pb2.SampleStreamRequest(batch_size=4, table="nope")]), timeout=5))
    assert e.value.details().startswith("table: no table 'nope'")
    assert table.info().sample_calls_total == 0


def test_an_unknown_table_on_sample_stream_is_not_found_like_the_other_calls(buffer_server):
    stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(buffer_server[0]))
    with pytest.raises(grpc.RpcError) as e:
        next(stub.SampleStream(iter([buffer_pb2.SampleStreamRequest(batch_size=4, table="nope")]), timeout=5))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_buffer_of_several_tables_routes_by_name_and_needs_one():
    replay, queue = _table("uniform"), _table("fifo", 64)
    with _serving(BufferServicer({"replay": replay, "queue": queue})) as address:
        sender = ChunkSender(address, table="queue")
        try:
            for i in range(3):
                assert sender.send(transitions(8, start=8 * i), worker_id=0, policy_version=1, env_steps=16)
            assert sender.flush(5)
        finally:
            sender.close()
        client = BufferClient(address)
        assert (client.info("queue").size, client.info("queue").env_steps_total, client.info("replay").inserts_total) == (24, 48, 0)
        with pytest.raises(grpc.RpcError) as e:
            client.info()  # two tables: a request must name one
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "tables: replay, queue" in e.value.details()
        prefetcher = BatchPrefetcher(address, batch_size=8, batches_per_request=1, prefetch_requests=1, table="queue")
        try:
            assert [_obs0(prefetcher.next(timeout_s=5)) for _ in range(3)] == [list(range(8 * i, 8 * i + 8)) for i in range(3)]
        finally:
            prefetcher.close()


# ---- prioritized tables: UpdatePriorities ---------------------------------------------------------------------


def test_update_priorities_skews_what_a_prioritized_table_serves():
    table = _table("prioritized", 16, priority_exponent=1.0)
    with _serving(BufferServicer({"default": table})) as address:
        client = BufferClient(address)
        _add(client.stub, wire.encode_chunk(transitions(16)))
        first = client.sample(batch_size=16)
        assert first.weights is not None and first.weights.dtype == np.float32 and np.all(first.weights == 1.0)  # all at max priority
        np.testing.assert_array_equal(first.keys, _obs0(first))
        assert client.update_priorities(np.array([5, 9]), np.array([100.0, 0.0])) == 2
        rows = client.sample(batch_size=16, num_batches=50)
        counts = np.bincount(rows.keys, minlength=16)
        assert counts[5] > 0.8 * 800 and counts[9] == 0  # P(5) = 100 / 114
        np.testing.assert_array_equal(rows.keys, _obs0(rows))
        assert rows.weights[rows.keys == 5].max() < rows.weights[rows.keys != 5].min()  # the over-drawn item weighs less
        _add(client.stub, wire.encode_chunk(transitions(8, start=16)))  # keys 16..23 overwrite keys 0..7
        assert client.update_priorities(np.array([5, 20, 30]), np.array([1.0, 1.0, 1.0])) == 1  # 5 is gone, 30 never came


def test_priority_updater_sends_priorities_in_the_background():
    table = _table("prioritized", 16, priority_exponent=1.0)
    with _serving(BufferServicer({"default": table})) as address:
        client = BufferClient(address)
        _add(client.stub, wire.encode_chunk(transitions(16)))
        updater = PriorityUpdater(address)
        try:
            updater.put(np.array([2, 3]), np.array([0.0, 0.0], np.float32))
            updater.put(np.array([3, 11]), np.array([50.0, 200.0], np.float32))  # 3: the last priority wins
            assert updater.flush(5) and updater.sent_total == 4
        finally:
            updater.close()
        counts = np.bincount(client.sample(batch_size=16, num_batches=50).keys, minlength=16)
        assert counts[2] == 0 and counts[11] > counts[3] > counts[0]  # 200 : 50 : 1


def test_update_priorities_on_a_uniform_table_is_failed_precondition_and_the_updater_survives_it(buffer_server, caplog):
    address, table = buffer_server
    client = BufferClient(address)
    _add(client.stub, wire.encode_chunk(transitions(8)))
    with pytest.raises(grpc.RpcError) as e:
        client.update_priorities(np.array([0, 1]), np.array([1.0, 2.0]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and e.value.details().startswith("table: ")
    assert "uniform" in e.value.details()
    updater = PriorityUpdater(address)
    try:
        with caplog.at_level(logging.WARNING, logger="titan_rl.clients.buffer"):
            updater.put(np.array([0]), np.array([1.0], np.float32))
            assert updater.flush(5) and updater.sent_total == 0
        assert "FAILED_PRECONDITION" in caplog.text and "1 priorities dropped" in caplog.text
        updater.put(np.array([1]), np.array([1.0], np.float32))
        assert updater.flush(5)  # still running
    finally:
        updater.close()
    assert client.info().size == 8


def _priorities_request(keys: np.ndarray, priorities: np.ndarray) -> buffer_pb2.UpdatePrioritiesRequest:
    request = buffer_pb2.UpdatePrioritiesRequest()
    wire.fill(request.keys, keys)
    wire.fill(request.priorities, priorities)
    return request


@pytest.mark.parametrize(
    ("keys", "priorities", "field"),
    [
        (np.array([0, 1]), np.array([1.0, np.nan], np.float32), "priorities: must be finite, >= 0 and <= 1e+30"),
        (np.array([0, 1]), np.array([1.7e308, 1.7e308]), "priorities: must be finite, >= 0 and <= 1e+30"),  # made the sum tree inf
        (np.array([0, 1]), np.array([1.0, np.inf]), "priorities: must be finite"),
        (np.array([0, 1]), np.array([1.0, -2.0], np.float32), "priorities: must be finite, >= 0 and <= 1e+30"),
        (np.array([0, 1]), np.array([1.0, 2.0, 3.0], np.float32), "priorities: must be 2 floats, got float32 of shape (3,)"),
        (np.array([0, 1]), np.array([1, 2], np.int64), "priorities: must be 2 floats, got int64"),
        (np.array([0.0, 1.0]), np.array([1.0, 2.0], np.float32), "keys: must be a vector of integers, got float64"),
        (np.array([[0, 1]]), np.array([[1.0, 2.0]], np.float32), "keys: must be a vector of integers"),
    ],
)
def test_bad_priorities_are_invalid_argument_naming_the_field_and_change_nothing(keys, priorities, field):
    table = _table("prioritized", 16, priority_exponent=1.0)
    with _serving(BufferServicer({"default": table})) as address:
        stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(address))
        _add(stub, wire.encode_chunk(transitions(16)))
        before = table.sampler.tree.values.copy()
        with pytest.raises(grpc.RpcError) as e:
            stub.UpdatePriorities(_priorities_request(keys, priorities), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)
        np.testing.assert_array_equal(table.sampler.tree.values, before)
        assert stub.UpdatePriorities(_priorities_request(np.array([0]), np.array([3.0])), timeout=5).updated == 1  # still serving


# ---- FIFO tables ------------------------------------------------------------------------------------------------


def test_sample_on_a_fifo_table_is_failed_precondition():
    with _serving(BufferServicer({"segments": _table("fifo", 64)})) as address:
        client = BufferClient(address)
        _add(client.stub, wire.encode_chunk(transitions(16)))
        with pytest.raises(grpc.RpcError) as e:
            client.sample(batch_size=4)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert e.value.details().startswith("table: 'segments' is a queue")
        info = client.info()
        assert (info.kind, info.size, info.sampled_rows_total) == ("fifo", 16, 0)  # nothing was handed out


def test_sample_stream_on_a_fifo_table_hands_each_item_out_once_in_order():
    table = _table("fifo", 64)
    with _serving(BufferServicer({"default": table})) as address:
        client = BufferClient(address)
        _add(client.stub, wire.encode_chunk(transitions(8)))
        credits = [buffer_pb2.SampleStreamRequest(batch_size=4)] * 2
        replies = [r.sample for r in client.stub.SampleStream(iter(credits), timeout=5)]
        assert [decode_sample(r).fields["obs"][:, 0].tolist() for r in replies] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert all(not r.HasField("weights") and not r.HasField("keys") for r in replies)
        assert client.info().size == 0
        _add(client.stub, wire.encode_chunk(transitions(4, start=8)))
        prefetcher = BatchPrefetcher(address, batch_size=2, batches_per_request=2, prefetch_requests=1)
        try:
            assert [_obs0(prefetcher.next(timeout_s=5)) for _ in range(2)] == [[8, 9], [10, 11]]  # never 0..7 again
            assert prefetcher.next(timeout_s=0.3) is None  # the queue is empty: the next credit waits
        finally:
            prefetcher.close()
        info = client.info()
        assert (info.size, info.inserts_total, info.sampled_rows_total) == (0, 12, 12)


def test_sample_stream_on_a_fifo_table_drops_items_of_a_policy_too_old():
    table = _table("fifo", 64, max_policy_lag=2)
    with _serving(BufferServicer({"default": table})) as address:
        client = BufferClient(address)
        chunks = [wire.encode_chunk(transitions(4, start=4 * i), policy_version=v) for i, v in enumerate([1, 4, 2, 3, 5])]
        _add(client.stub, *chunks)
        prefetcher = BatchPrefetcher(address, batch_size=4, batches_per_request=1, prefetch_requests=1, min_policy_version=lambda: 5)
        try:
            assert [_obs0(prefetcher.next(timeout_s=5)) for _ in range(3)] == [[4, 5, 6, 7], [12, 13, 14, 15], [16, 17, 18, 19]]
        finally:
            prefetcher.close()
        info = client.info()  # versions 1 and 2 were dropped: 5 - 2 = 3 is the oldest kept
        assert (info.dropped_stale_total, info.size, info.sampled_rows_total) == (8, 0, 12)
        # what the trainer logs (charts/dropped_stale_records): the drops were seen nowhere but in Info
        assert client.sources().dropped_stale_total == 8


def test_a_chunk_larger_than_a_queue_goes_in_as_the_learner_reads_and_a_sample_larger_is_invalid_argument():
    with _serving(BufferServicer({"default": _table("fifo", 8)})) as address:
        client = BufferClient(address)
        adding = client.stub.Add(iter([buffer_pb2.AddRequest(chunk=wire.encode_chunk(transitions(12)), ack=True)]), timeout=10)
        replies = client.stub.SampleStream(iter([buffer_pb2.SampleStreamRequest(batch_size=4)] * 3), timeout=10)
        assert [decode_sample(r.sample).fields["obs"][:, 0].tolist() for r in replies] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
        assert next(adding).items_added == 12
        _add(client.stub, wire.encode_chunk(transitions(8)))
        with pytest.raises(grpc.RpcError) as e:
            next(client.stub.SampleStream(iter([buffer_pb2.SampleStreamRequest(batch_size=3, num_batches=3)]), timeout=5))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("batch_size * num_batches = 9 rows cannot come from a queue of 8")
        assert client.info().size == 8  # nothing was handed out


def test_a_stream_asking_for_a_batch_larger_than_what_is_stored_waits_for_it_instead_of_failing(buffer_server):
    address, _ = buffer_server  # min_buffer_size 64: the rate limiter lets samples through from 64 items on
    stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(address))
    _add(stub, wire.encode_chunk(transitions(80)))
    prefetcher = BatchPrefetcher(address, batch_size=100, batches_per_request=1)
    try:
        assert prefetcher.next(timeout_s=1.0) is None  # waiting, not an error
        _add(stub, wire.encode_chunk(transitions(40, start=80)))
        sample = prefetcher.next(timeout_s=10.0)
        assert sample is not None and len(sample) == 100
    finally:
        prefetcher.close()


def _bool_byte(fields: dict, name: str, byte: int) -> buffer_pb2.AddRequest:
    """A chunk of `fields` whose first `name` byte is `byte`: not 0 or 1, a bool numpy would read as True."""
    chunk = wire.encode_chunk(fields)
    records, layout = wire.decode_chunk(chunk)
    raw = bytearray(chunk.records.data)
    raw[layout.slots[name].offset] = byte
    chunk.records.data = bytes(raw)
    return chunk


@pytest.mark.parametrize(
    ("make_chunk", "message"),
    [
        (
            lambda: wire.encode_chunk({**transitions(10), "reward": np.r_[np.ones(9), np.nan].astype(np.float32)}),
            "reward: holds nan or inf at row 9",
        ),
        (lambda: wire.encode_chunk({**transitions(10), "obs": np.full((10, 4), np.inf, np.float32)}), "obs: holds nan or inf at row 0"),
        (
            lambda: wire.encode_chunk({**transitions(10), "action": np.r_[np.zeros(9), 7].astype(np.int64)}),
            "action: holds values in [0, 7], outside [0, 1]",
        ),
        (lambda: wire.encode_chunk({**transitions(10), "action": np.full(10, -1, np.int64)}), "action: holds values in [-1, -1]"),
        (lambda: _bool_byte(transitions(10), "terminated", 0x7F), "terminated: holds a bool byte other than 0 or 1"),
    ],
)
def test_values_that_break_the_signature_are_invalid_argument_naming_the_field_and_store_nothing(make_chunk, message):
    from titan_rl.buffer.process import start

    server, port, tables = start(make_config("buffer_server.port=0", "train.min_buffer_size=64"))  # DQN on CartPole: 2 actions
    try:
        stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with pytest.raises(grpc.RpcError) as e:
            _add(stub, make_chunk())
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"chunk.records.{message}" in e.value.details()
        assert stub.Info(buffer_pb2.InfoRequest(), timeout=5).inserts_total == 0
        _add(stub, wire.encode_chunk(transitions(10)))  # and the server goes on serving
        assert stub.Info(buffer_pb2.InfoRequest(), timeout=5).inserts_total == 10
    finally:
        for table in tables.values():
            table.close()
        server.stop(grace=None).wait()


class _BreaksFirstStream(BufferServicer):
    """Stores the first stream's chunks and breaks it after the third, before any ack for it is sent."""

    def __init__(self, tables):
        super().__init__(tables)
        self.streams = 0

    def Add(self, request_iterator, context):
        self.streams += 1
        if self.streams > 1:
            yield from super().Add(request_iterator, context)
            return
        for i, request in enumerate(request_iterator):
            chunk = request.chunk
            self.tables["default"].insert_records(*wire.decode_chunk(chunk), chunk.env_steps, origin=(chunk.sender_id, chunk.sequence))
            if i == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the stream broke")
            if request.ack:
                yield buffer_pb2.AddResponse()


def test_chunk_sender_resends_what_a_broken_stream_left_unacknowledged_and_the_buffer_stores_it_once():
    table = _table("uniform")
    servicer = _BreaksFirstStream({"default": table})
    with _serving(servicer) as address:
        sender = ChunkSender(address, max_in_flight=8)
        try:
            for i in range(6):
                assert sender.send(transitions(8, start=8 * i), 0, 0)
            assert sender.flush(10)
            assert servicer.streams == 2 and sender.chunks_resent >= 1
            stored = sorted(table.layout.views(table.storage.gather(np.arange(table.info().size)))["obs"][:, 0].astype(int))
            assert stored == list(range(48)), "every chunk arrived, and once"
            assert table.info().env_steps_total == 48
        finally:
            sender.close()
