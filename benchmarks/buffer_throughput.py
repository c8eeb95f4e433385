"""Buffer service throughput from one client, against raw-bytes gRPC streams (the ceiling).

Measures, with a real `python -m titan_rl.buffer` subprocess (rate limiting effectively off):
  inserts: CartPole transitions/s through Add with ChunkSender (what actors use: encodes each chunk,
           keeps 512 rows unacknowledged, asks for an ack every half of that) for chunks of 64,
           256, 1024 and 4096 transitions;
  samples: batches/s through SampleStream with BatchPrefetcher (what the learner uses: the config's
           rows_per_request and prefetch_requests) for batch 64 and 256.
Diagnostic rows: the same streams driven by the bare stub with pre-encoded requests (Add) or
protobuf-parsed replies only (SampleStream), and an in-process replay table (titan_rl.buffer.table.Table
built as the service builds its own; no gRPC).

Two baselines, both benchmarks.raw_stream_server (another subprocess, the buffer's server options
and thread pool), moving bytes messages of exactly our message sizes:
  free:  the ceiling of the target, paced only by HTTP/2 flow control. Inserts: a client stream
         answered once at its end. Samples: a server stream pushing until cancelled, read by
         gRPC's single-threaded client.
  acked: our own protocol's flow control on raw bytes (as Add: the same window and acks; as
         SampleStream: every credit answered by one message, at most 2 credits out): what the
         protocol costs is free / acked.
A third, for samples only: floor, the same server stream but each message sampled from as many
records as the buffer holds (benchmarks.raw_stream_server's PushSampled: indices drawn, records
gathered, one bytes object). It is the least work any replay buffer does for a sampled message,
with no protobuf and no protocol of ours: floor / free is a measured reference for what a buffer
in Python can reach here, not a proof.
All alternate, 5 repetitions of 1.5 s; the rates shown are medians, a ratio is the median of
the 5 side-by-side ratios (see paired_ratio).
Target: every row >= 0.7x the free raw stream (the verdict uses the worst row).

    .venv/bin/python -m benchmarks.buffer_throughput [--quick]
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Mapping

import numpy as np

from benchmarks.common import (
    CONFIG,
    HOST,
    acked_stream_rate,
    alternate_runs,
    buffer_service,
    cartpole_transitions,
    describe_mode,
    drained_stream_rate,
    emit_json,
    fill_buffer,
    in_process_table,
    new_address,
    paired_ratio,
    parse_args,
    print_table,
    pushed_stream_rate,
    rate_for,
    service,
    take_batches,
    verdict,
)
from benchmarks.raw_stream_server import DRAIN, PUSH, PUSH_SAMPLED, SINK, SOURCE, sampled_request, sink_round
from titan_rl import wire
from titan_rl.buffer.service import BufferServicer
from titan_rl.buffer.table import Table
from titan_rl.clients.buffer import MAX_UNACKED_ROWS, BatchPrefetcher, ChunkSender, ack_every, chunks_in_flight
from titan_rl.config import load_config
from titan_rl.rpc import make_channel
from titan_rl.service import keep_freed_memory
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc

TARGET = 0.7


def chunk_sender_rate(address: str, fields: Mapping[str, np.ndarray], duration_s: float, warmup: int = 5) -> float:
    """Transitions/s that ChunkSender gets acknowledged."""
    rows = len(fields["reward"])
    sender = ChunkSender(address, max_in_flight=chunks_in_flight(rows))  # the window a rollout worker uses for such chunks
    try:
        for _ in range(warmup):
            sender.send(fields, 0, 0)
        sender.flush(30.0)
        sent, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < duration_s:
            sender.send(fields, 0, 0)
            sent += 1
        if not sender.flush(30.0):
            raise RuntimeError("chunks still unacknowledged after 30 s")
        return sent * rows / (time.monotonic() - t0)
    finally:
        sender.close()


def prefetcher_rate(address: str, batch_size: int, per_request: int, prefetch: int, duration_s: float) -> float:
    """Batches/s that the learner gets from BatchPrefetcher.next()."""
    prefetcher = BatchPrefetcher(address, batch_size, per_request, prefetch)
    try:
        return rate_for(lambda: take_batches(prefetcher, 1), duration_s)
    finally:
        prefetcher.close()


def sample_response_bytes(table: Table, batch_size: int, per_request: int) -> int:
    """Size of one SampleStreamResponse as the buffer service builds it."""
    response = buffer_pb2.SampleStreamResponse()
    name = table.spec.name
    BufferServicer({name: table}).fill_sample(response.sample, name, table.sample(batch_size, per_request))
    return response.ByteSize()


def table(results: list[dict], *keys: str) -> None:
    cols = ["free", "acked", "titan", "stub", "in_process"]
    rows = [[*(r[k] for k in keys), r["bytes"], *(r[c] for c in cols), f"{r['ratio']:.2f}", f"{r['ratio_acked']:.2f}"] for r in results]
    print_table([*keys, "bytes/msg", *cols, "titan/free", "titan/acked"], rows)


def ratios(runs: dict[str, list[float]]) -> dict[str, float]:
    return {"ratio": paired_ratio(runs, "titan", "free"), "ratio_acked": paired_ratio(runs, "titan", "acked")}


def main() -> None:
    args = parse_args(__doc__)
    keep_freed_memory()  # this process is the client, as a rollout worker or the trainer is, and they call it too
    chunks, batches = ((64, 1024), (64,)) if args.quick else ((64, 256, 1024, 4096), (64, 256))
    duration_s, reps = (0.3, 2) if args.quick else (1.5, 5)
    cfg = load_config(CONFIG)
    prefetch = cfg.train.prefetch_requests
    capacity = cfg.buffer_server.capacity_items
    buffer_port, buffer_address = new_address()
    raw_port, raw_address = new_address()
    with contextlib.ExitStack() as stack:
        stack.enter_context(buffer_service(buffer_port))
        stack.enter_context(service("benchmarks.raw_stream_server", ["--host", HOST, "--port", str(raw_port)], raw_address))
        raw = stack.enter_context(make_channel(raw_address))
        stub = buffer_pb2_grpc.BufferServiceStub(stack.enter_context(make_channel(buffer_address)))
        local = in_process_table(capacity, seed=0)
        data = cartpole_transitions(capacity)
        local.insert_fields(data)
        fill_buffer(buffer_address, data)  # both run full, as a replay buffer does in steady state

        def insert_rates(rows: int) -> dict:
            fields = cartpole_transitions(rows)
            request = buffer_pb2.AddRequest(chunk=wire.encode_chunk(fields))
            size = request.ByteSize()
            window = chunks_in_flight(rows)
            every = ack_every(window)
            stub_round = [request] * (every - 1) + [buffer_pb2.AddRequest(chunk=request.chunk, ack=True)]
            raw_round = sink_round(size, every)
            runs = alternate_runs(
                {
                    "free": lambda: rows * drained_stream_rate(raw.stream_unary(DRAIN), bytes(size), duration_s),
                    "acked": lambda: rows * acked_stream_rate(raw.stream_stream(SINK), raw_round, duration_s, in_flight=window),
                    "titan": lambda: chunk_sender_rate(buffer_address, fields, duration_s),
                    "stub": lambda: rows * acked_stream_rate(stub.Add, stub_round, duration_s, in_flight=window),
                    "in_process": lambda: rate_for(lambda: local.insert_fields(fields), duration_s),
                },
                reps,
            )
            r = {name: statistics.median(v) for name, v in runs.items()}
            return {"chunk": rows, "window": window, "ack_every": every, "bytes": size, **r, **ratios(runs)}

        def sample_rates(batch_size: int) -> dict:
            per_request = cfg.train.batches_per_request(batch_size)
            size = sample_response_bytes(local, batch_size, per_request)
            credit = buffer_pb2.SampleStreamRequest(batch_size=batch_size, num_batches=per_request)
            raw_credits = [size.to_bytes(8, "little")]
            sampled = sampled_request(batch_size * per_request, local.layout.record_size, capacity)
            runs = alternate_runs(
                {
                    "free": lambda: per_request * pushed_stream_rate(raw_address, PUSH, raw_credits[0], duration_s),
                    "floor": lambda: per_request * pushed_stream_rate(raw_address, PUSH_SAMPLED, sampled, duration_s),
                    "acked": lambda: (
                        per_request * acked_stream_rate(raw.stream_stream(SOURCE), raw_credits, duration_s, in_flight=prefetch)
                    ),
                    "titan": lambda: prefetcher_rate(buffer_address, batch_size, per_request, prefetch, duration_s),
                    "stub": lambda: per_request * acked_stream_rate(stub.SampleStream, [credit], duration_s, in_flight=prefetch),
                    "in_process": lambda: rate_for(lambda: len(local.sample(batch_size, per_request).keys) // batch_size, duration_s),
                },
                reps,
            )
            r = {name: statistics.median(v) for name, v in runs.items()}
            floor = {"floor_over_free": paired_ratio(runs, "floor", "free"), "titan_over_floor": paired_ratio(runs, "titan", "floor")}
            return {"batch": batch_size, "per_message": per_request, "bytes": size, **r, **ratios(runs), **floor}

        inserts = [insert_rates(rows) for rows in chunks]
        samples = [sample_rates(batch_size) for batch_size in batches]

    mode = describe_mode(args.quick, reps, duration_s)
    print(f"\nbuffer throughput, one client, {mode}")
    print("\ninserts, transitions/s (titan = ChunkSender over Add; stub = Add with pre-encoded requests;")
    print(f"window = unacknowledged chunks, {MAX_UNACKED_ROWS} rows as a rollout worker keeps; an ack asked for every ack_every)")
    table(inserts, "chunk", "window", "ack_every")
    print(
        f"\nsamples, batches/s ({cfg.train.rows_per_request} rows per message; titan = BatchPrefetcher.next(); stub = parsed replies only)"
    )
    table(samples, "batch", "per_message")
    print(f"\nsamples against the floor (free stream, each message sampled from {capacity:,} records: the least work a buffer does)")
    print_table(
        ["batch", "free", "floor", "titan", "floor/free", "titan/floor"],
        [[r["batch"], r["free"], r["floor"], r["titan"], f"{r['floor_over_free']:.2f}", f"{r['titan_over_floor']:.2f}"] for r in samples],
    )
    worst = min(r["ratio"] for r in inserts + samples)
    worst_acked = min(r["ratio_acked"] for r in inserts + samples)
    print(f"\nworst titan/acked-stream ratio (our protocol's flow control on raw bytes; diagnostic): {worst_acked:.2f}x")
    met = verdict("worst titan/free-stream ratio", worst, TARGET)
    figures = {"inserts": inserts, "samples": samples, "worst_ratio": worst, "worst_ratio_acked": worst_acked}
    emit_json("buffer_throughput", args.quick, **figures, target=TARGET, met=met)


if __name__ == "__main__":
    main()
