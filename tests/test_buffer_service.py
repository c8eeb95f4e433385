"""The buffer service over real gRPC on a free port."""

import contextlib
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from tests.helpers import transitions
from titan_rl import wire
from titan_rl.buffer.client import BatchPrefetcher, BufferClient, ChunkSender
from titan_rl.buffer.rate_limiter import RateLimiter
from titan_rl.buffer.replay import ReplayBuffer
from titan_rl.buffer.service import BufferServicer
from titan_rl.errors import TitanError
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc


def _add(stub, *chunks):
    """Send chunks on one Add stream, each asking for an ack; returns the acknowledgements."""
    return list(stub.Add(iter([buffer_pb2.AddRequest(chunk=c, ack=True) for c in chunks]), timeout=5))


def test_add_acknowledges_each_chunk_that_asks_and_info_counts_them(buffer_server):
    address, _ = buffer_server
    client = BufferClient(address)
    acks = _add(client.stub, wire.encode_chunk(transitions(10)), wire.encode_chunk(transitions(5)))
    assert [a.transitions_added for a in acks] == [10, 15]
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
    assert [a.transitions_added for a in acks] == [15, 18]
    assert client.info().size == 18


def test_sampling_before_enough_data_is_failed_precondition(buffer_server):
    client = BufferClient(buffer_server[0])
    with pytest.raises(grpc.RpcError) as e:
        client.sample(batch_size=8)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fewer than batch_size=8" in e.value.details()


def _without_field(name: str):
    def mutate(chunk):
        kept = [f for f in chunk.transitions.layout.fields if f.name != name]
        del chunk.transitions.layout.fields[:]
        chunk.transitions.layout.fields.extend(kept)
        return chunk

    return mutate


def _with_field(**field):
    def mutate(chunk):
        chunk.transitions.layout.fields.add(**field)
        return chunk

    return mutate


def _field_set(name: str, **values):
    def mutate(chunk):
        field = next(f for f in chunk.transitions.layout.fields if f.name == name)
        for key, value in values.items():
            if key == "shape":
                field.shape[:] = value
            else:
                setattr(field, key, value)
        return chunk

    return mutate


@pytest.mark.parametrize(
    ("chunk", "field"),
    [
        (
            lambda: wire.encode_chunk({**transitions(10), "obs": np.zeros((10, 3), np.float32), "next_obs": np.zeros((10, 3), np.float32)}),
            "chunk.transitions.obs: got rows of shape (3,)",
        ),
        (
            lambda: wire.encode_chunk({**transitions(10), "terminated": np.zeros(10, np.float32)}),
            "chunk.transitions.terminated: dtype float32 must be bool",
        ),
        (lambda: _without_field("reward")(wire.encode_chunk(transitions(10))), "chunk.transitions.reward: missing"),
        (lambda: _field_set("action", offset=48)(wire.encode_chunk(transitions(10))), "chunk.transitions.action: 8 bytes at offset 48"),
        (lambda: _field_set("obs", dtype="object")(wire.encode_chunk(transitions(10))), "chunk.transitions.obs: unknown dtype"),
        (lambda: _field_set("obs", shape=[-4])(wire.encode_chunk(transitions(10))), "chunk.transitions.obs: shape (-4,) needs"),
        (
            lambda: _with_field(name="junk", dtype="uint8", shape=[1] * 70, offset=0)(wire.encode_chunk(transitions(10))),
            "chunk.transitions.junk: shape (1, 1, 1",
        ),
        (
            lambda: _with_field(name="junk", dtype="uint8", shape=[0, 2**40, 2**40], offset=0)(wire.encode_chunk(transitions(10))),
            "chunk.transitions.junk: shape (0, 1099511627776, 1099511627776) of uint8 cannot fit",
        ),
        (lambda: _field_set("reward", offset=0)(wire.encode_chunk(transitions(10))), "chunk.transitions.action: overlaps reward"),
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
    chunk.transitions.data = chunk.transitions.data[:-3]
    with pytest.raises(grpc.RpcError) as e:
        _add(client.stub, chunk)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk.transitions.data" in e.value.details()
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


class _AckRecorder(BufferServicer):
    """The real servicer, noting which Add requests asked for an ack (True, False; None: no chunk)."""

    def __init__(self, replay):
        super().__init__(replay)
        self.asked: list[bool | None] = []

    def Add(self, request_iterator, context):
        def noted():
            for request in request_iterator:
                self.asked.append(request.ack if request.HasField("chunk") else None)
                yield request

        yield from super().Add(noted(), context)


@contextlib.contextmanager
def _serving(servicer: BufferServicer, port: int = 0) -> Iterator[str]:
    """`servicer` on a real gRPC server on `port` (0: a free one); yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    buffer_pb2_grpc.add_BufferServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        servicer.replay.close()
        server.stop(None)


def test_chunk_sender_asks_for_an_ack_every_half_window_and_flush_asks_for_the_rest():
    servicer = _AckRecorder(ReplayBuffer(1000))
    with _serving(servicer) as address:
        sender = ChunkSender(address, max_in_flight=4)
        deadline = time.monotonic() + 10
        try:
            for i in range(7):
                assert sender.send(transitions(8, start=8 * i), 0, 0, keep_waiting=lambda: time.monotonic() < deadline)
            assert sender.flush(5)
            assert sender.chunks_acked == 7 and servicer.replay.info().size == 56
            assert servicer.asked == [False, True, False, True, False, True, False, None]
        finally:
            sender.close()


def test_chunk_sender_stops_at_its_window_while_the_buffer_holds_inserts_back_and_starts_afresh_after_a_restart():
    """The rate limiter lets 2 chunks of 8 in, then holds the third: 4 chunks may be unacknowledged, not 5.
    The buffer then restarts with 2 acks outstanding: the new stream's acks must not be matched to them."""
    replay = ReplayBuffer(1000, RateLimiter(samples_per_insert=1, min_size_to_sample=0, slack_transitions=8))
    sender = None
    try:
        with _serving(BufferServicer(replay)) as address:
            sender = ChunkSender(address, max_in_flight=4)
            deadline = time.monotonic() + 10
            for i in range(6):
                assert sender.send(transitions(8, start=8 * i), 0, 0, keep_waiting=lambda: time.monotonic() < deadline)
            deadline = time.monotonic() + 1
            assert not sender.send(transitions(8), 0, 0, keep_waiting=lambda: time.monotonic() < deadline)
            assert sender.chunks_acked == 2 and replay.info().size == 16
        restarted = ReplayBuffer(1000)
        with _serving(BufferServicer(restarted), port=int(address.rpartition(":")[2])):
            deadline = time.monotonic() + 20
            for _ in range(5):
                assert sender.send(transitions(8), 0, 0, keep_waiting=lambda: time.monotonic() < deadline)
            assert sender.flush(10) and sender.chunks_acked == 2 + 5 and restarted.info().size == 40
    finally:
        if sender is not None:
            sender.close(flush_timeout_s=0)


class _AcksEveryRequest(BufferServicer):
    """A buffer from before AddRequest.ack: it answers every request."""

    def Add(self, request_iterator, context):
        for request in request_iterator:
            self.replay.add_records(*wire.decode_chunk(request.chunk))
            yield buffer_pb2.AddResponse()


def test_chunk_sender_reports_acks_it_did_not_ask_for_instead_of_miscounting():
    with _serving(_AcksEveryRequest(ReplayBuffer(1000))) as address:
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

    with pytest.raises(TitanError, match="INVALID_ARGUMENT: chunk.transitions.obs"):
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
        acked = sender.chunks_acked
        for _ in range(5):
            sender.send(transitions(8), 0, 0)
        assert sender.flush(5) and sender.chunks_acked == acked + 5  # the counts of the dead stream are gone
    finally:
        sender.close(0)
        replay.close()
        server.stop(grace=None).wait()


def test_a_bad_credit_on_sample_stream_is_invalid_argument_naming_the_field(buffer_server):
    address, replay = buffer_server
    replay.add(transitions(100))
    stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(address))
    credits = [buffer_pb2.SampleStreamRequest(batch_size=8), buffer_pb2.SampleStreamRequest(batch_size=8, num_batches=-1)]
    replies = stub.SampleStream(iter(credits), timeout=5)
    assert len(next(replies).sample.indices.data) == 8 * 8
    with pytest.raises(grpc.RpcError) as e:
        next(replies)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_batches" in e.value.details()


def test_cancelled_sample_streams_stop_their_producer_threads(buffer_server):
    """Streams waiting on an empty buffer, then cancelled, must not leave a thread behind each."""
    import threading

    def producers() -> int:
        return sum(t.name == "sample-producer" for t in threading.enumerate())

    address, replay = buffer_server
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
    replay.add(transitions(100))
    replies = stub.SampleStream(iter([buffer_pb2.SampleStreamRequest(batch_size=8)]), timeout=5)
    assert next(replies).sample.records.rows == 8
    channel.close()


def test_prefetcher_reports_an_unreadable_batch_instead_of_waiting_forever():
    """A peer speaking the protocol wrongly (here: a layout whose field overruns the record) is an error for the learner."""
    from concurrent import futures

    from titan_rl.launch import free_port

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
    address, replay = buffer_server
    replay.add(transitions(100))

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
    address, replay = buffer_server
    replay.add(transitions(100))
    stub = buffer_pb2_grpc.BufferServiceStub(grpc.insecure_channel(address))
    huge = {"batch_size": 8, "num_batches": 2**30}
    with pytest.raises(grpc.RpcError) as e:
        stub.Sample(buffer_pb2.SampleRequest(**huge), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch_size * num_batches" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        next(stub.SampleStream(iter([buffer_pb2.SampleStreamRequest(**huge)]), timeout=5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch_size * num_batches" in e.value.details()
    assert BufferClient(address).sample(batch_size=8)["obs"].shape == (8, 4)  # still serving
