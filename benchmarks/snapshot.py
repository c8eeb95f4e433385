"""Replay snapshots: seconds to save and restore 1M CartPole transitions, and what a save costs the learner.

What it measures, against a real buffer server (titan_rl.buffer.process.serve, gRPC on 127.0.0.1)
in a child process holding one DQN replay table of --items CartPole n-step transitions (filled in
process, every page written):
- save: `Snapshotter.save()`, the buffer's own periodic save: the table's rows streamed into one
  .npz without its lock, then the rows inserted meanwhile, the sampler and counters; fsynced and
  renamed (the two phases shown apart);
- restore: `restore()` into a fresh table, as the buffer does at start (read the file, check it,
  copy it in);
- sample latency: this process calls Sample (batch 64 x 32 batches = 2,048 rows, what a learner's
  request holds) back to back the whole time; each call is classed by whether it overlapped a save.
  Baseline: the p99 of calls that overlapped no save, in the same run. Also shown, as the
  contrast Reverb's blocking checkpoints make: calls during a save that copies the whole table
  under the lock at once (`Table.state_dict()`), which is what a naive snapshot does.

Targets (issue #12): save <= 1 s and restore <= 1 s for 1M transitions; p99 during saves <= 2x
the baseline p99.

    .venv/bin/python -m benchmarks.snapshot [--items 1000000] [--saves 5] [--dir runs/bench-snapshot] [--quick] [--in-process]

--in-process samples from a thread of the buffer's own process with `Table.sample` (no gRPC, no
second process): what a save costs through the table's lock and the GIL alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import multiprocessing as mp
import os
import platform
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.common import QUICK_MODE, cartpole_transitions, emit_json, print_table, verdict
from titan_rl.rpc import CLIENT_OPTIONS
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc

SAVE_TARGET_S = 1.0
P99_TARGET = 2.0
FILL_CHUNK = 65_536


def _buffer_child(items: int, directory: str, conn) -> None:
    """The buffer: serve a filled table, then save, save blockingly or restore when told; report windows."""
    from benchmarks.common import CONFIG, NO_RATE_LIMIT
    from titan_rl.buffer.process import serve
    from titan_rl.buffer.service import tables_for
    from titan_rl.buffer.snapshot import Snapshotter, restore, write_snapshot, yield_the_cores
    from titan_rl.config import load_config
    from titan_rl.registry import build_algorithm

    cfg = load_config(CONFIG, [NO_RATE_LIMIT, f"buffer_server.capacity_items={items}", "buffer_server.port=0"])
    server, port, servicer = serve(cfg)
    (table,) = servicer.tables.values()
    data = cartpole_transitions(FILL_CHUNK)  # the fields of DQN's n-step transition record
    for start in range(0, items, FILL_CHUNK):
        n = min(FILL_CHUNK, items - start)
        table.insert_fields({name: values[:n] for name, values in data.items()}, env_steps=n)
    path = Path(directory) / "buffer_snapshot.npz"
    snapshotter = Snapshotter(servicer.tables, path, interval_s=0)
    conn.send(("ready", port, table.info().size, table.layout.record_size))
    while (command := conn.recv()) != "stop":
        started = time.monotonic()
        if command == "save":  # on a thread of its own at the lowest priority, as the buffer's snapshotter runs
            with concurrent.futures.ThreadPoolExecutor(1, initializer=yield_the_cores) as saver:
                stats = saver.submit(snapshotter.save).result()
            conn.send(("saved", started, time.monotonic(), stats.rows_s, stats.rest_s, stats.bytes))
        elif command == "save_blocking":
            state = table.state_dict()  # the whole table copied under the lock at once
            copied = time.monotonic()
            write_snapshot(path, {next(iter(servicer.tables)): state}, {})
            conn.send(("saved", started, time.monotonic(), copied - started, time.monotonic() - copied, path.stat().st_size))
        elif command == "restore":
            fresh = tables_for(build_algorithm(cfg), cfg.seed)
            restore(fresh, path)
            (loaded,) = fresh.values()
            conn.send(("restored", started, time.monotonic(), loaded.info().size))
    server.stop(grace=None).wait()


def _sampler(address: str, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    """Call Sample back to back until `stop`; append (start, end) monotonic times of each call."""
    channel = grpc.insecure_channel(address, options=CLIENT_OPTIONS)
    stub = buffer_pb2_grpc.BufferServiceStub(channel)
    request = buffer_pb2.SampleRequest(batch_size=64, num_batches=32)
    while not stop.is_set():
        started = time.monotonic()
        stub.Sample(request, timeout=30)
        out.append((started, time.monotonic()))
    channel.close()


def _in_process(items: int, saves: int, directory: Path) -> None:
    """The same saves with the sampler a thread of the buffer's own process, calling `Table.sample`
    directly: no gRPC, no second process, so what is left is the table's lock and the GIL."""
    from benchmarks.common import in_process_table
    from titan_rl.buffer.snapshot import Snapshotter

    table = in_process_table(items)
    data = cartpole_transitions(FILL_CHUNK)
    for start in range(0, items, FILL_CHUNK):
        n = min(FILL_CHUNK, items - start)
        table.insert_fields({name: values[:n] for name, values in data.items()}, env_steps=n)
    snapshotter = Snapshotter({"default": table}, directory / "buffer_snapshot.npz", interval_s=0)
    calls: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            started = time.monotonic()
            table.sample(64, 32)
            calls.append((started, time.monotonic()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(1.0)
    windows = []
    for _ in range(saves):
        started = time.monotonic()
        snapshotter.save()
        windows.append((started, time.monotonic()))
        time.sleep(0.5)
    stop.set()
    sampler.join()
    during = [(e - s) * 1e3 for s, e in calls if any(s < we and e > ws for ws, we in windows)]
    baseline = [(e - s) * 1e3 for s, e in calls if not any(s < we and e > ws for ws, we in windows)]
    print(f"in process, {items:,} items, {saves} saves: Table.sample(64 x 32) back to back on a thread of the buffer's process")
    print_table(
        ["Table.sample calls", "calls", "p50 ms", "p99 ms", "max ms"],
        [
            ["no save (baseline)", len(baseline), *(f"{x:.3f}" for x in (_p(baseline, 50), _p(baseline, 99), max(baseline)))],
            ["during Snapshotter.save", len(during), *(f"{x:.3f}" for x in (_p(during, 50), _p(during, 99), max(during)))],
        ],
    )
    print(f"sample p99 during saves / baseline p99, in process: {_p(during, 99) / _p(baseline, 99):.2f}x")


def _p(latencies_ms: list[float], q: float) -> float:
    return float(np.percentile(latencies_ms, q)) if latencies_ms else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--saves", type=int, default=5, help="saves of each kind (and restores)")
    parser.add_argument("--dir", default="runs/bench-snapshot", help="where the snapshot is written (a real disk, not tmpfs)")
    parser.add_argument("--quick", action="store_true", help="100k items, 2 saves: a smoke test, not a measurement")
    parser.add_argument("--in-process", action="store_true", help="sample from a thread of the buffer's process instead, no gRPC")
    args = parser.parse_args()
    items, saves = (100_000, 2) if args.quick else (args.items, args.saves)
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    if args.in_process:
        try:
            _in_process(items, saves, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_buffer_child, args=(items, str(directory), child), daemon=True)
    proc.start()
    try:
        _, port, size, record_bytes = parent.recv()
        mode = QUICK_MODE if args.quick else f"{saves} saves of each kind"
        print(f"snapshot benchmark, {datetime.date.today()}, {platform.node()} ({os.cpu_count()} cores), {mode}")
        print(f"buffer: {size:,} items of {record_bytes} bytes ({size * record_bytes / 1e6:.0f} MB), snapshots in {directory}/")
        calls: list[tuple[float, float]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sampler, args=(f"127.0.0.1:{port}", stop, calls), daemon=True)
        sampler.start()
        time.sleep(3.0)  # baseline before any save
        windows: dict[str, list[tuple[float, float]]] = {"save": [], "save_blocking": []}
        phases: dict[str, list[tuple[float, float]]] = {"rows": [], "rest": []}
        results: dict[str, list[tuple[float, float, int]]] = {"save": [], "save_blocking": []}
        for _ in range(saves):
            for kind in ("save", "save_blocking"):
                parent.send(kind)
                _, started, ended, first_s, second_s, nbytes = parent.recv()
                windows[kind].append((started, ended))
                results[kind].append((first_s, second_s, nbytes))
                if kind == "save":  # its two phases apart: streaming the rows, then the rest and the sync
                    phases["rows"].append((started, started + first_s))
                    phases["rest"].append((started + first_s, ended))
                time.sleep(1.0)  # calls between saves count towards the baseline
        stop.set()
        sampler.join()
        restores = []
        for _ in range(saves):
            parent.send("restore")
            _, started, ended, restored = parent.recv()
            assert restored == size, (restored, size)
            restores.append(ended - started)
        parent.send("stop")
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        shutil.rmtree(directory, ignore_errors=True)

    def overlapping(spans: list[tuple[float, float]]) -> list[float]:
        return [(e - s) * 1e3 for s, e in calls if any(s < we and e > ws for ws, we in spans)]

    during = {kind: overlapping(spans) for kind, spans in (windows | phases).items()}
    all_windows = windows["save"] + windows["save_blocking"]
    baseline = [(e - s) * 1e3 for s, e in calls if not any(s < we and e > ws for ws, we in all_windows)]
    save_s = [c + w for c, w, _ in results["save"]]
    rows = [
        ["no save (baseline)", len(baseline), _p(baseline, 50), _p(baseline, 99), "-"],
        ["during Snapshotter.save", len(during["save"]), _p(during["save"], 50), _p(during["save"], 99), f"{np.median(save_s):.2f} s"],
        ["  of which writing the rows", len(during["rows"]), _p(during["rows"], 50), _p(during["rows"], 99), "-"],
        ["  of which patch, sampler, sync", len(during["rest"]), _p(during["rest"], 50), _p(during["rest"], 99), "-"],
        [
            "during a whole-table locked copy",
            len(during["save_blocking"]),
            _p(during["save_blocking"], 50),
            _p(during["save_blocking"], 99),
            f"{np.median([c + w for c, w, _ in results['save_blocking']]):.2f} s",
        ],
    ]
    print_table(["Sample calls (2,048 rows)", "calls", "p50 ms", "p99 ms", "save, median"], rows)
    rows_s, rest_s = np.median([r for r, _, _ in results["save"]]), np.median([r for _, r, _ in results["save"]])
    megabytes = results["save"][0][2] / 1e6
    print(f"save: {', '.join(f'{s:.2f}' for s in save_s)} s (median rows {rows_s:.2f} s + rest {rest_s:.2f} s, {megabytes:.0f} MB)")
    print(f"restore: {', '.join(f'{s:.2f}' for s in restores)} s")
    ratio = _p(during["save"], 99) / _p(baseline, 99)
    met = []
    for what, seconds in (("save", float(np.median(save_s))), ("restore", float(np.median(restores)))):
        met.append(seconds <= SAVE_TARGET_S)
        print(f"{what} of {size:,} items, median: {seconds:.2f} s (target <= {SAVE_TARGET_S:g} s): {'MET' if met[-1] else 'NOT MET'}")
    met.append(verdict("sample p99 during saves / baseline p99", ratio, P99_TARGET, at_most=True))
    emit_json(
        "snapshot",
        args.quick,
        items=size,
        save_s=save_s,
        restore_s=restores,
        p99_baseline_ms=_p(baseline, 99),
        p99_during_save_ms=_p(during["save"], 99),
        p99_during_locked_copy_ms=_p(during["save_blocking"], 99),
        p99_ratio=ratio,
        met=all(met),
    )


if __name__ == "__main__":
    main()
