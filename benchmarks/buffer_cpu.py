"""CPU time per message of the process serving a stream: where buffer_throughput's gap goes.

Rates on this shared 2-core VM drift by tens of percent between repetitions; CPU seconds per
message do not, so they show what each side of a stream costs. For every stream below, a
fixed window is timed while one client streams; the serving process's user and system CPU
(from /proc/<pid>/stat) and this (client) process's CPU are divided by the messages moved in it.

  samples, batch 64 (2,048 rows, ~115 KB a message):
    raw push     benchmarks.raw_stream_server's free server stream, single-threaded client
    raw sampled  its PushSampled: the same, but each message gathered from the buffer's capacity of records (the least work)
    raw acked    its Source: every message answered a credit, at most 2 credits out
    titan        the buffer's SampleStream read by BatchPrefetcher.next() (32 batches a message)
  inserts, 1,024-row chunks (~49 KB a message):
    raw free     its Drain: a client stream answered once, at its end
    raw acked    its Sink with Add's protocol for such chunks: 2 unanswered, each answered
    titan        ChunkSender into the buffer's Add

Ratio: the serving process's CPU per message over the raw stream's with the same flow control.
Linux only (/proc).

    .venv/bin/python -m benchmarks.buffer_cpu [--quick]
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

from benchmarks.buffer_throughput import sample_response_bytes
from benchmarks.common import (
    CONFIG,
    HOST,
    buffer_service,
    cartpole_transitions,
    fill_buffer,
    in_process_table,
    new_address,
    parse_args,
    print_table,
    pushed_messages,
    service,
    take_batches,
)
from benchmarks.raw_stream_server import DRAIN, PUSH, PUSH_SAMPLED, SINK, SOURCE, sampled_request, sink_round
from titan_rl import wire
from titan_rl.clients.buffer import BatchPrefetcher, ChunkSender, ack_every, chunks_in_flight
from titan_rl.config import load_config
from titan_rl.rpc import make_channel
from titan_rl.service import keep_freed_memory
from titan_rl.v1 import buffer_pb2

TICKS = os.sysconf("SC_CLK_TCK")
ORDER = [
    (stream, who) for stream in ("samples b64", "inserts 1024") for who in ("raw push", "raw sampled", "raw free", "raw acked", "titan")
]


def process_cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid`, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def cpu_per_message(server_pid: int, messages: Iterator[object], duration_s: float, warmup_s: float = 0.3) -> dict[str, float]:
    """Drain `messages` (one item per message moved) for `duration_s` after `warmup_s`; CPU us per message."""
    end_warmup = time.monotonic() + warmup_s
    for _ in messages:
        if time.monotonic() >= end_warmup:
            break

    def count_for_duration() -> int:
        count, t0 = 0, time.monotonic()
        for _ in messages:
            count += 1
            if time.monotonic() - t0 >= duration_s:
                break
        return count

    return measured_per_message(server_pid, count_for_duration)


def measured_per_message(server_pid: int, move: Callable[[], int]) -> dict[str, float]:
    """CPU us per message of the server process and of this one while `move()` moves messages (returns how many)."""
    t0, server0, client0 = time.monotonic(), process_cpu_s(server_pid), time.process_time()
    count = move()
    elapsed, server1, client1 = time.monotonic() - t0, process_cpu_s(server_pid), time.process_time()
    return {
        "msgs_per_s": count / elapsed,
        "server_user_us": (server1[0] - server0[0]) / count * 1e6,
        "server_sys_us": (server1[1] - server0[1]) / count * 1e6,
        "client_us": (client1 - client0) / count * 1e6,
    }


def drained_cpu(server_pid: int, drain: Callable[[Iterator], bytes], payload: bytes, duration_s: float) -> dict[str, float]:
    """CPU per message of a client stream answered once (benchmarks.raw_stream_server's Drain), after a 0.3 s warm-up call."""

    def send_for(seconds: float) -> int:
        def requests() -> Iterator[bytes]:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                yield payload

        return int.from_bytes(drain(requests()), "little")

    send_for(0.3)
    return measured_per_message(server_pid, lambda: send_for(duration_s))


def acked_messages(open_call: Callable[[Iterator], Iterator], round_: list[object], in_flight: int) -> Iterator[object]:
    """One item per message of a bidi stream answering each round of requests once (see benchmarks.common.acked_stream_rate)."""
    slots = threading.Semaphore(in_flight)
    done = threading.Event()

    def requests() -> Iterator:
        while not done.is_set():
            for request in round_:
                slots.acquire()
                yield request

    call = open_call(requests())
    try:
        for _ in call:
            for request in round_:
                slots.release()
                yield request
    finally:
        done.set()
        slots.release()
        call.cancel()


def prefetched_messages(address: str, batch_size: int, per_request: int, prefetch: int) -> Iterator[object]:
    prefetcher = BatchPrefetcher(address, batch_size, per_request, prefetch)
    try:
        while True:
            take_batches(prefetcher, per_request)
            yield None
    finally:
        prefetcher.close()


def sent_chunks(address: str, rows: int) -> Iterator[object]:
    fields = cartpole_transitions(rows)
    sender = ChunkSender(address, max_in_flight=chunks_in_flight(rows))
    try:
        while True:
            sender.send(fields, 0, 0)
            yield None
    finally:
        sender.close(flush_timeout_s=0)


def main() -> None:
    args = parse_args(__doc__)
    keep_freed_memory()
    duration_s = 0.5 if args.quick else 4.0
    cfg = load_config(CONFIG)
    batch_size, rows = 64, 1024
    per_request = cfg.train.batches_per_request(batch_size)
    prefetch = cfg.train.prefetch_requests
    buffer_port, buffer_address = new_address()
    raw_port, raw_address = new_address()
    with contextlib.ExitStack() as stack:
        buffer = stack.enter_context(buffer_service(buffer_port))
        raw_server = stack.enter_context(service("benchmarks.raw_stream_server", ["--host", HOST, "--port", str(raw_port)], raw_address))
        raw = stack.enter_context(make_channel(raw_address))
        fill_buffer(buffer_address, cartpole_transitions(cfg.buffer_server.capacity_items))
        local = in_process_table(batch_size * per_request)
        local.insert_fields(cartpole_transitions(batch_size * per_request))
        credit = sample_response_bytes(local, batch_size, per_request).to_bytes(8, "little")
        capacity = cfg.buffer_server.capacity_items
        sampled = sampled_request(batch_size * per_request, local.layout.record_size, capacity)
        chunk_bytes = buffer_pb2.AddRequest(chunk=wire.encode_chunk(cartpole_transitions(rows))).ByteSize()
        sink = sink_round(chunk_bytes, ack_every(chunks_in_flight(rows)))
        runs = {
            ("samples b64", "raw push"): (raw_server.pid, lambda: pushed_messages(raw_address, PUSH, credit)),
            ("samples b64", "raw sampled"): (raw_server.pid, lambda: pushed_messages(raw_address, PUSH_SAMPLED, sampled)),
            ("samples b64", "raw acked"): (raw_server.pid, lambda: acked_messages(raw.stream_stream(SOURCE), [credit], prefetch)),
            ("samples b64", "titan"): (buffer.pid, lambda: prefetched_messages(buffer_address, batch_size, per_request, prefetch)),
            ("inserts 1024", "raw acked"): (
                raw_server.pid,
                lambda: acked_messages(raw.stream_stream(SINK), sink, chunks_in_flight(rows)),
            ),
            ("inserts 1024", "titan"): (buffer.pid, lambda: sent_chunks(buffer_address, rows)),
        }
        results = {key: cpu_per_message(pid, messages(), duration_s) for key, (pid, messages) in runs.items()}
        results[("inserts 1024", "raw free")] = drained_cpu(raw_server.pid, raw.stream_unary(DRAIN), bytes(chunk_bytes), duration_s)
        results = dict(sorted(results.items(), key=lambda item: ORDER.index(item[0])))

    print(f"\nCPU per message, one client, {duration_s:g} s windows{' (QUICK MODE: a smoke test)' if args.quick else ''}")
    table = []
    for (stream, who), r in results.items():
        acked = results[(stream, "raw acked")]
        ratio = (r["server_user_us"] + r["server_sys_us"]) / (acked["server_user_us"] + acked["server_sys_us"])
        table.append([stream, who, r["msgs_per_s"], r["server_user_us"], r["server_sys_us"], r["client_us"], f"{ratio:.2f}"])
    print_table(["stream", "who", "msgs/s", "server user us", "server sys us", "client us", "server cpu / raw acked"], table)


if __name__ == "__main__":
    main()
