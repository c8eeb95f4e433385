"""Resident memory of the buffer service holding 1M CartPole transitions vs the raw bytes of that data.

A real `python -m titan_rl.buffer` subprocess (buffer_server.capacity_items=1,000,000) receives 1,000,000
CartPole transitions through Add (ChunkSender, chunks of the config's vector_steps_per_chunk x envs_per_worker). Its VmRSS (and
peak VmHWM) from /proc/<pid>/status is read once it serves (interpreter + imports + gRPC server,
after one Info call) and again after the inserts. Baseline: the raw bytes of the data,
1M x (4*4 + 8 + 4 + 4*4 + 1 + 1) = 46 MB.
Target: RSS *growth* (after - before) <= 1.3x the raw bytes; the growth is what holding the data
costs, while the start-up RSS is a fixed price of the interpreter and libraries. Total RSS / raw
bytes is printed beside it.

    .venv/bin/python -m benchmarks.buffer_memory [--quick]
"""

from __future__ import annotations

import contextlib
import time

from benchmarks.common import (
    CONFIG,
    QUICK_MODE,
    buffer_service,
    cartpole_transitions,
    emit_json,
    fill_buffer,
    new_address,
    parse_args,
    print_table,
    verdict,
)
from titan_rl.clients.buffer import BufferClient
from titan_rl.config import load_config

TARGET = 1.3
MIB = 1024 * 1024


def status_kib(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status, e.g. VmRSS or VmHWM."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise KeyError(key)


def main() -> None:
    args = parse_args(__doc__)
    capacity = 100_000 if args.quick else 1_000_000
    rollout = load_config(CONFIG).rollout_server
    chunk = rollout.vector_steps_per_chunk * rollout.envs_per_worker
    data = cartpole_transitions(capacity)
    raw_bytes = sum(a.nbytes for a in data.values())
    port, address = new_address()
    with buffer_service(port, f"buffer_server.capacity_items={capacity}") as proc:
        with contextlib.closing(BufferClient(address)) as client:
            client.info()
            before = status_kib(proc.pid, "VmRSS") * 1024
            t0 = time.monotonic()
            fill_buffer(address, data, chunk)
            insert_s = time.monotonic() - t0
            if (stored := client.info().size) != capacity:
                raise RuntimeError(f"the buffer holds {stored} transitions, expected {capacity}")
            time.sleep(0.5)
            after, peak = (status_kib(proc.pid, key) * 1024 for key in ("VmRSS", "VmHWM"))
    growth = after - before
    mode = QUICK_MODE if args.quick else "one run"
    print(f"\nbuffer service memory, {capacity:,} CartPole transitions in chunks of {chunk} ({insert_s:.1f} s to insert); {mode}")
    print_table(
        ["", "MiB", "/ raw bytes"],
        [
            ["raw bytes of the data", raw_bytes / MIB, "1.00"],
            ["RSS before inserting", before / MIB, f"{before / raw_bytes:.2f}"],
            ["RSS after inserting (total)", after / MIB, f"{after / raw_bytes:.2f}"],
            ["RSS growth", growth / MIB, f"{growth / raw_bytes:.2f}"],
            ["peak RSS (VmHWM)", peak / MIB, f"{peak / raw_bytes:.2f}"],
        ],
    )
    print()
    met = verdict("RSS growth / raw bytes", growth / raw_bytes, TARGET, at_most=True)
    print(f"(total RSS / raw bytes: {after / raw_bytes:.2f}x, not the target's measure)")
    emit_json(
        "buffer_memory",
        args.quick,
        transitions=capacity,
        raw_bytes=raw_bytes,
        rss_before=before,
        rss_after=after,
        rss_peak=peak,
        growth_ratio=growth / raw_bytes,
        total_ratio=after / raw_bytes,
        target=TARGET,
        met=met,
    )


if __name__ == "__main__":
    main()
