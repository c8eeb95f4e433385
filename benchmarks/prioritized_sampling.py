"""Batches/s of prioritized against uniform sampling from a 1M-item table, in process (no gRPC).

What it measures: the cost of drawing one batch of slots (and, for the prioritized sampler, their
importance weights) and gathering their records, prioritized against uniform, at the same batch
size. A stand-in for a full table: 1,000,000 CartPole transition records (48 bytes each, uint8
[items, 48], every page written so the gather reads real memory), a PrioritizedSampler
(titan_rl.buffer.samplers, default alpha/beta/epsilon) holding all of them with random
priorities, and a UniformSampler. One batch is what the buffer does for it:
`sampler.sample(batch, items, rng)` and `np.take(records, slots, axis=0)`. For the prioritized
sampler that is one `rng.random(batch)` and one call of its numba kernel (stratified points, the
sum-tree descent, the clip into the filled range and the weights), or with --numpy its numpy
fallback; for the uniform one, `rng.integers`. Not timed: priority updates, building the tree,
and numba's one-time compilation or cache load (done, and reported, before the timing starts).

The two alternate in windows of 0.5 s (--seconds of each per batch size), so the machine's drift
hits both alike; the rates shown are medians, the ratio the median of side-by-side ratios (see
paired_ratio). Baseline: uniform. Target: prioritized / uniform >= 0.5 at every batch size.

    .venv/bin/python -m benchmarks.prioritized_sampling [--items 1000000] [--batch-size 64 256] [--seconds 3] [--numpy] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import time
from collections.abc import Callable

import numpy as np

from benchmarks.common import alternate_runs, describe_mode, emit_json, paired_ratio, print_table, rate_for, verdict
from titan_rl.buffer import samplers
from titan_rl.buffer.samplers import PrioritizedSampler, Sampler, UniformSampler

TARGET = 0.5
RECORD_BYTES = 48  # one CartPole transition record (titan_rl.records)
WINDOW_S = 0.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="records in the table, all of them filled")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 256], help="rows a batch")
    parser.add_argument("--seconds", type=float, default=3.0, help=f"time of each sampler per batch size, {WINDOW_S:g} s a window")
    parser.add_argument("--numpy", action="store_true", help="run the prioritized sampler on its numpy fallback, not numba")
    parser.add_argument("--quick", action="store_true", help="100,000 items and 1 s: a smoke test, not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.items, args.seconds = 100_000, 1.0
    if args.items < 1 or min(args.batch_size) < 1 or args.seconds <= 0:
        parser.error("--items and --batch-size must be >= 1, --seconds > 0")
    return args


def cpu_model() -> str:
    """The `model name` of /proc/cpuinfo (Linux), else whatever platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def prepare_kernels(use_numpy: bool) -> str:
    """Compile or load the sampler's numba kernels now, outside the timing; what it cost, in words."""
    if use_numpy:
        return "prioritized sampler on its numpy fallback (--numpy)"
    t0 = time.monotonic()
    kernels = samplers._kernels()
    elapsed = time.monotonic() - t0
    if kernels is None:
        raise RuntimeError("numba is not installed (pyproject.toml); pass --numpy to measure the numpy fallback")
    import numba

    how = "loaded from numba's cache" if not sum(kernels.locate.stats.cache_misses.values()) else "compiled (no cache yet)"
    return f"prioritized sampler on numba {numba.__version__} kernels: import + {how} in {elapsed:.2f} s, before timing"


def batch_step(sampler: Sampler, records: np.ndarray, batch: int, rng: np.random.Generator) -> Callable[[], int]:
    """One batch as the buffer makes it: draw the slots, gather their records."""
    size = len(records)

    def step() -> int:
        slots, _ = sampler.sample(batch, size, rng)
        np.take(records, slots, axis=0)
        return 1

    return step


def main() -> None:
    args = parse_args()
    reps = max(1, round(args.seconds / WINDOW_S))
    rng = np.random.default_rng(0)
    records = np.zeros((args.items, RECORD_BYTES), np.uint8)
    # np.zeros leaves the pages unmapped and every read of them hits the kernel's one shared zero
    # page, which stays in cache; writing them gives each record memory of its own, as a full buffer has.
    records[...] = rng.integers(0, 256, records.shape, dtype=np.uint8)
    kernels = prepare_kernels(args.numpy)
    t0 = time.monotonic()
    prioritized = PrioritizedSampler(args.items, compiled=not args.numpy)
    slots = np.arange(args.items)
    prioritized.on_insert(slots)
    prioritized.update_priorities(slots, rng.random(args.items))
    setup_s = time.monotonic() - t0
    uniform = UniformSampler()
    drawn, _ = prioritized.sample(max(args.batch_size), args.items, rng)
    if drawn.min() < 0 or drawn.max() >= args.items:
        raise RuntimeError(f"the prioritized sampler drew slot {drawn.max()} of a table of {args.items}")

    rows, results = [], []
    for batch in args.batch_size:
        runs = {
            name: functools.partial(rate_for, batch_step(sampler, records, batch, rng), WINDOW_S, warmup_s=0.05)
            for name, sampler in (("uniform", uniform), ("prioritized", prioritized))
        }
        values = alternate_runs(runs, reps)
        medians = {name: float(np.median(v)) for name, v in values.items()}
        ratio = paired_ratio(values, "prioritized", "uniform")
        rows.append([str(batch), medians["uniform"], medians["prioritized"], f"{ratio:.2f}"])
        results.append({"batch_size": batch, **medians, "ratio": ratio})

    print(f"\nprioritized vs uniform sampling, {args.items:,} items of {RECORD_BYTES} bytes; {describe_mode(args.quick, reps, WINDOW_S)}")
    print(f"sum tree of {args.items:,} leaves built in {setup_s:.2f} s (insert + one update_priorities of every item)")
    print(kernels)
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; numpy {np.__version__}, Python {platform.python_version()}")
    print(datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    print()
    print_table(["batch size", "uniform batches/s", "prioritized batches/s", "prioritized / uniform"], rows)
    print()
    met = all([verdict(f"prioritized / uniform, batch {r['batch_size']}", r["ratio"], TARGET) for r in results])
    emit_json(
        "prioritized_sampling",
        args.quick,
        items=args.items,
        record_bytes=RECORD_BYTES,
        results=results,
        cpu=cpu_model(),
        numpy=np.__version__,
        sampler_impl="numpy" if args.numpy else "numba",
        target=TARGET,
        met=met,
    )


if __name__ == "__main__":
    main()
