"""py-spy on both sides of the sample stream: which threads of the buffer and of its client are busy, and with what.

A real `python -m titan_rl.buffer`, full (the config's capacity of CartPole transitions), serves SampleStream to
BatchPrefetcher.next() in this process (batch 64, the config's rows per message and prefetch), as
in buffer_throughput. Meanwhile py-spy samples both processes (`record --idle --threads`, 200 Hz;
--nonblocking, so neither is paused to be read, which rules out --native). Each sample's
innermost Python frame sorts it:
  waiting       a Python lock, condition or queue (threading.py, queue.py)
  gRPC          inside grpc's Python layer or its C core below it (blocked in a poll or busy)
  our code      titan_rl, and numpy called from it (np.take's Python wrapper is numpy's frame)
  other         anything else
Shares are of all samples of that process, threads included while idle.

    .venv/bin/pip install -r benchmarks/requirements.txt   # py-spy
    .venv/bin/python -m benchmarks.buffer_profile [--quick]
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import buffer_service, cartpole_transitions, fill_buffer, new_address, parse_args, print_table, take_batches
from titan_rl.clients.buffer import BatchPrefetcher
from titan_rl.config import load_config
from titan_rl.service import keep_freed_memory

BATCH_SIZE = 64
RATE_HZ = 200


def category(frames: list[str]) -> str:
    """Sort one sample, its py-spy frames `function (file:line)` outermost first, into the categories of the docstring."""
    where = [frame.rpartition("(")[2] for frame in frames] or [""]
    if where[-1].startswith(("threading.py", "queue.py")):
        return "waiting"
    if "grpc/" in where[-1]:
        return "gRPC"
    if "titan_rl/" in where[-1] or ("numpy/" in where[-1] and any("titan_rl/" in w for w in where)):
        return "our code"
    return "other"


def summarise(raw: str) -> dict[tuple[str, str], int]:
    """Samples per (thread name, category) from py-spy's raw output (`thread (id): name;frame;...;frame count`)."""
    counts: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        head, *frames = stack.split(";")
        thread = re.sub(r"[-_]?\d+", "", head.partition(": ")[2]) or head  # Thread-3 and Thread-4 are the same role
        counts[(thread, category(frames))] += int(count)
    return counts


def record(pid: int, duration_s: float, output: Path) -> subprocess.Popen:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install -r benchmarks/requirements.txt")
    args = ["record", "--pid", str(pid), "--duration", str(duration_s), "--rate", str(RATE_HZ), "--idle", "--threads", "--nonblocking"]
    return subprocess.Popen([py_spy, *args, "--format", "raw", "--output", str(output)], stdout=subprocess.DEVNULL)


def main() -> None:
    args = parse_args(__doc__)
    keep_freed_memory()
    duration_s = 2 if args.quick else 8
    cfg = load_config("config/cartpole.yaml")
    port, address = new_address()
    with tempfile.TemporaryDirectory() as tmp, buffer_service(port) as buffer:
        fill_buffer(address, cartpole_transitions(cfg.buffer_server.capacity_items))
        per_message = cfg.train.batches_per_request(BATCH_SIZE)
        prefetcher = BatchPrefetcher(address, BATCH_SIZE, per_message, cfg.train.prefetch_requests)

        try:
            take_batches(prefetcher, 20 * per_message)  # past start-up
            outputs = {"buffer": Path(tmp, "buffer.txt"), "client": Path(tmp, "client.txt")}
            spies = [record(pid, duration_s, outputs[name]) for name, pid in (("buffer", buffer.pid), ("client", os.getpid()))]
            batches, t0 = 0, time.monotonic()
            while any(spy.poll() is None for spy in spies):  # this thread is the learner meanwhile
                batches += take_batches(prefetcher, per_message)
            rate = batches / (time.monotonic() - t0)
        finally:
            prefetcher.close()
        if any(spy.returncode for spy in spies):
            raise SystemExit("py-spy failed: it needs ptrace rights over both processes (root, or kernel.yama.ptrace_scope=0)")
        summaries = {name: summarise(path.read_text()) for name, path in outputs.items()}

    print(f"\npy-spy, {RATE_HZ} Hz for {duration_s} s, batch {BATCH_SIZE}: {rate:,.0f} batches/s while sampled")
    for name, counts in summaries.items():
        total = sum(counts.values())
        print(f"\n{name} process ({total:,} samples)")
        rows = [[thread, what, f"{100 * n / total:.1f}%"] for (thread, what), n in counts.most_common() if n / total >= 0.002]
        print_table(["thread", "in", "share"], rows)
        for what in ("our code", "gRPC", "waiting", "other"):
            share = sum(n for (_, w), n in counts.items() if w == what) / total
            print(f"  {what}: {100 * share:.1f}%")


if __name__ == "__main__":
    main()
