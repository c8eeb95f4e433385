"""Learner scaling: rows/s a learner group consumes against train.learners, from a filled buffer.

Real processes: `python -m titan_rl.buffer` (rate limiter off) holding --items CartPole transitions,
and `python -m titan_rl.trainer` with train.learners = N (ranks 1..N-1 its own processes, gradients
averaged over gloo), fresh per N. No actors: the learners train on what is stored, as fast as they
can. Measured over the window, after a warm-up: growth of the buffer's sampled rows (every rank's
batches) per second, and optimizer steps/s (rows / (N x batch_size)). The ratio to N = 1 is what
data-parallel learners buy on this machine; each rank is a process wanting a core of its own.

    .venv/bin/python -m benchmarks.learner_scaling [--learners 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import tempfile
import time

from benchmarks.common import (
    CONFIG,
    QUICK_MODE,
    buffer_service,
    cartpole_transitions,
    emit_json,
    fill_buffer,
    new_address,
    print_table,
    service,
)
from titan_rl.clients.buffer import BufferClient
from titan_rl.config import load_config


def rows_per_s(learners: int, items: int, warmup_s: float, window_s: float) -> float:
    buffer_port, buffer_address = new_address()
    trainer_port, trainer_address = new_address()
    with contextlib.ExitStack() as stack:
        run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="learner_scaling-"))
        shared = [f"train.learners={learners}", "budget.max_env_steps=100000000"]  # keys both read (titan_rl/shared_keys.py)
        stack.enter_context(buffer_service(buffer_port, f"buffer_server.capacity_items={items}", *shared))
        fill_buffer(buffer_address, cartpole_transitions(items))
        args = ["--config", CONFIG, "--port", str(trainer_port), f"buffer_server.port={buffer_port}", *shared]
        args += ["logging.console=false", "logging.video=false", f"logging.run_dir={run_dir}", f"logging.checkpoint_path={run_dir}/ck.pth"]
        args += ["budget.target_eval_return=null", f"buffer_server.capacity_items={items}"]
        stack.enter_context(service("titan_rl.trainer", args, trainer_address, {"WANDB_MODE": "disabled"}))
        buffer = stack.enter_context(contextlib.closing(BufferClient(buffer_address)))
        time.sleep(warmup_s)
        first, t0 = buffer.info().sampled_rows_total, time.monotonic()
        time.sleep(window_s)
        last, t1 = buffer.info().sampled_rows_total, time.monotonic()
    return (last - first) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learners", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--quick", action="store_true", help="3 s windows: a smoke test")
    args = parser.parse_args()
    warmup_s, window_s = (3.0, 3.0) if args.quick else (8.0, 15.0)
    batch = load_config(CONFIG).train.batch_size
    print(f"learner scaling, {datetime.date.today()}, {platform.node()} ({os.cpu_count()} cores); "
          f"{QUICK_MODE if args.quick else f'{window_s:.0f} s windows'}")  # fmt: skip
    results = [{"learners": n, "rows_per_s": rows_per_s(n, args.items, warmup_s, window_s)} for n in args.learners]
    base = results[0]["rows_per_s"]
    print_table(
        ["learners", "rows/optimizer step", "rows/s sampled", "optimizer steps/s", "rows/s vs first"],
        [[r["learners"], r["learners"] * batch, f"{r['rows_per_s']:,.0f}", f"{r['rows_per_s'] / (r['learners'] * batch):,.0f}",
          f"{r['rows_per_s'] / base:.2f}x"] for r in results],
    )  # fmt: skip
    emit_json("learner_scaling", args.quick, batch_size=batch, results=results)


if __name__ == "__main__":
    main()
