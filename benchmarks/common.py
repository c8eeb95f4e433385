"""Shared helpers for the throughput benchmarks: service subprocesses, CartPole data, timing, reporting."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.experimental
import numpy as np

from titan_rl.clients.buffer import BatchPrefetcher, ChunkSender
from titan_rl.config import load_config
from titan_rl.launcher import free_port
from titan_rl.rpc import CLIENT_OPTIONS, is_serving
from titan_rl.service import child_env

if TYPE_CHECKING:
    from titan_rl.algorithm import Batch, Learner
    from titan_rl.buffer.table import Table

REPO = Path(__file__).resolve().parent.parent
CONFIG = "config/cartpole.yaml"
HOST = "127.0.0.1"
NO_RATE_LIMIT = "buffer_server.rate_limit_slack_items=1000000000"  # inserts and samples never wait on each other
QUICK_MODE = "QUICK MODE (a smoke test, not a measurement)"


def parse_args(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and short windows: a smoke test, not a measurement")
    return parser.parse_args()


def describe_mode(quick: bool, reps: int, duration_s: float) -> str:
    return QUICK_MODE if quick else f"median of {reps} alternating repetitions of {duration_s:g} s"


def cartpole_transitions(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n CartPole-shaped transitions: obs/next_obs float32[4], action int64, reward float32, terminated/truncated bool."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, 4)).astype(np.float32)
    return {
        "obs": obs,
        "action": rng.integers(0, 2, n).astype(np.int64),
        "reward": np.ones(n, dtype=np.float32),
        "next_obs": (obs + 0.01).astype(np.float32),
        "terminated": rng.random(n) < 0.05,
        "truncated": np.zeros(n, dtype=bool),
    }


def in_process_table(capacity: int, seed: int = 0) -> Table:
    """A replay table in this process, as the buffer service builds it from CONFIG (the algorithm's
    table spec and record signature) but holding `capacity` items, rate limiting effectively off:
    the no-gRPC baseline. It fits `cartpole_transitions`."""
    from titan_rl.buffer.table import Table  # here, so that importing this module loads no torch
    from titan_rl.registry import build_algorithm

    algorithm = build_algorithm(load_config(CONFIG, [NO_RATE_LIMIT]))
    spec = dataclasses.replace(algorithm.table(), capacity_items=capacity)
    return Table(spec, algorithm.record_spec(), seed=seed)


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def service(
    module: str, args: list[str], address: str, env: dict[str, str] | None = None, timeout_s: float = 90.0
) -> Iterator[subprocess.Popen]:
    """Run `python -m module *args` from the repo root until the block ends; yields once `address` reports SERVING.

    Output goes to a temporary file whose tail is shown if the process dies during start-up.
    """
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env({**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}),
            start_new_session=True,  # Ctrl-C reaches only the benchmark, which stops it
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not is_serving(address, timeout_s=0.5):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = "\n".join(log.read().decode(errors="replace").splitlines()[-20:])
                    raise RuntimeError(f"{module} did not start serving on {address} (exit code {proc.poll()}):\n{tail}")
                time.sleep(0.1)
            yield proc
        finally:
            stop_process(proc)


def buffer_service(port: int, *overrides: str) -> contextlib.AbstractContextManager[subprocess.Popen]:
    """A real `python -m titan_rl.buffer` on HOST:port with rate limiting effectively off."""
    args = ["--config", CONFIG, "--host", HOST, "--port", str(port), NO_RATE_LIMIT, *overrides]
    return service("titan_rl.buffer", args, f"{HOST}:{port}")


def fill_buffer(address: str, data: Mapping[str, np.ndarray], chunk: int = 1024) -> None:
    """Insert `data` into the buffer service through Add, `chunk` rows a message; raises unless every chunk is acknowledged."""
    rows = len(data["reward"])
    sender = ChunkSender(address)
    for i in range(0, rows, chunk):
        sender.send({k: a[i : i + chunk] for k, a in data.items()}, 0, 0)
    sender.close(flush_timeout_s=120.0)
    if sender.chunks_acked != -(-rows // chunk):
        raise RuntimeError(f"filling the buffer: {sender.chunks_acked} of {-(-rows // chunk)} chunks acknowledged")


def new_address() -> tuple[int, str]:
    port = free_port(HOST)
    return port, f"{HOST}:{port}"


def acked_stream_rate(
    open_call: Callable[[Iterator], Iterator], round_: Sequence[object], duration_s: float, warmup: int = 5, in_flight: int = 2
) -> float:
    """Messages/s of a bidi stream that answers each round of requests once: the requests of
    `round_` are sent over and over, the last of each round asks for the answer, and at most
    `in_flight` requests are unanswered (the protocols of Add and SampleStream; a SampleStream
    round is one credit, answered by one message).

    `open_call(requests)` starts the call. Requests stop `duration_s` after the `warmup`-th
    answer; the rate counts the messages of the rounds answered after it, up to the last one.
    """
    slots = threading.Semaphore(in_flight)
    end = float("inf")

    def requests() -> Iterator:
        while time.monotonic() < end:
            for request in round_:
                slots.acquire()
                yield request

    count, t0 = 0, 0.0
    for _ in open_call(requests()):
        for _ in round_:
            slots.release()
        count += 1
        if count == warmup:
            t0 = time.monotonic()
            end = t0 + duration_s
    return (count - warmup) * len(round_) / (time.monotonic() - t0)


def drained_stream_rate(open_call: Callable[[Iterator], bytes], request: object, duration_s: float) -> float:
    """Messages/s the server of a client-streaming call read, sending `request` for `duration_s`:
    no reply per message, so only HTTP/2 flow control paces the sender. `open_call(requests)`
    returns the server's count of messages read, as 8 little-endian bytes."""

    def requests() -> Iterator:
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            yield request

    t0 = time.monotonic()
    count = int.from_bytes(open_call(requests()), "little")
    return count / (time.monotonic() - t0)


def pushed_messages(address: str, method: str, request: bytes) -> Iterator[object]:
    """The messages of a server-streaming call that pushes until cancelled (cancelled when this
    generator is closed): no per-message flow control of ours, and gRPC's single-threaded client,
    which reads on the calling thread."""
    options = [*CLIENT_OPTIONS, (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
    with grpc.insecure_channel(address, options=options) as channel:
        call = channel.unary_stream(method)(request)
        try:
            yield from call
        finally:
            call.cancel()


def pushed_stream_rate(address: str, method: str, request: bytes, duration_s: float, warmup: int = 5) -> float:
    """Messages/s of `pushed_messages`, counted for `duration_s` after the `warmup`-th."""
    count, t0 = 0, 0.0
    with contextlib.closing(pushed_messages(address, method, request)) as messages:
        for _ in messages:
            count += 1
            if count == warmup:
                t0 = time.monotonic()
            elif count > warmup and time.monotonic() - t0 >= duration_s:
                break
    return (count - warmup) / (time.monotonic() - t0)


def take_batches(prefetcher: BatchPrefetcher, batches: int) -> int:
    """Take `batches` batches from `prefetcher.next()`, as the learner does; raises if one takes over 30 s."""
    for _ in range(batches):
        if prefetcher.next(timeout_s=30.0) is None:
            raise RuntimeError("no batch within 30 s")
    return batches


def rate_for(step: Callable[[], int], duration_s: float, warmup_s: float = 0.2) -> float:
    """Units/s of calling `step()` (returns how many units it did) for `duration_s`, after `warmup_s` of the same."""
    end = time.monotonic() + warmup_s
    while time.monotonic() < end:
        step()
    done, t0 = 0, time.monotonic()
    while (now := time.monotonic()) - t0 < duration_s:
        done += step()
    return done / (now - t0)


def updates_rate(learner: Learner, next_batch: Callable[[], Batch], duration_s: float, warmup_s: float = 0.5) -> float:
    """Learner updates/s, each on `next_batch()`, for `duration_s` after `warmup_s` of the same."""

    def one() -> int:
        learner.update(next_batch())
        return 1

    return rate_for(one, duration_s, warmup_s)


def alternate_runs(runs: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run every measurement `reps` times, interleaved (A B A B ...); every value of each."""
    values: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            values[name].append(run())
    return values


def alternate(runs: dict[str, Callable[[], float]], reps: int) -> dict[str, float]:
    """`alternate_runs`, reduced to the median of each measurement."""
    return {name: statistics.median(v) for name, v in alternate_runs(runs, reps).items()}


def paired_ratio(values: Mapping[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over repetitions of numerator / denominator measured side by side in that repetition.

    On a shared 2-core VM the machine's speed drifts by tens of percent over seconds; a ratio of
    neighbours cancels that drift, where a ratio of two medians taken apart does not.
    """
    return statistics.median(a / b for a, b in zip(values[numerator], values[denominator], strict=True))


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [list(headers)] + [[f"{c:,.1f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def verdict(what: str, ratio: float, target: float, at_most: bool = False) -> bool:
    """Print `what: ratio (target >= t): MET/NOT MET` and return whether it is met."""
    met = ratio <= target if at_most else ratio >= target
    print(f"{what}: {ratio:.2f}x (target {'<=' if at_most else '>='} {target:.2f}x): {'MET' if met else 'NOT MET'}")
    return met


def emit_json(benchmark: str, quick: bool, **results: object) -> None:
    print(json.dumps({"benchmark": benchmark, "quick": quick, **results}))
