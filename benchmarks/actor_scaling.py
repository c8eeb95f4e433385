"""Actor scaling: env steps/s stored in the buffer against the number of rollout replicas, for an
environment whose steps wait on something other than this machine's cores (benchmarks/slow_env.py:
CartPole plus 1 ms of sleep per step), with the learner off and with it on.

Real processes, as on separate hosts but on this machine: `python -m titan_rl.buffer`,
`python -m titan_rl.trainer`, and R x `python -m titan_rl.rollout` (replica ids 0..R-1, each 2
workers x 8 envs), all from config/cartpole.yaml with the env swapped. Fresh services per
measurement. Measured once every replica has stored data (BufferService.Sources) and the learner,
when on, has begun: growth of the buffer's env_steps_total over the window, and of its sampled rows
over batch_size (the learner's updates/s).
- learner off: the trainer serves the initial weights and never samples (its buffer address points
  where nothing listens); the buffer's rate limiter is off. What the actors alone can collect.
- learner on: the shipped config, rate limiter included (train.updates_per_env_step=0.5), so
  collection can run at most at 2 env steps per update: the learner caps it.
No target: a record of how collection scales with actors, and where the learner caps it
(docs/scaling.md).

    .venv/bin/python -m benchmarks.actor_scaling [--quick] [--replicas 1 2 4] [--step-ms 1]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import tempfile
import time

from benchmarks.common import CONFIG, NO_RATE_LIMIT, QUICK_MODE, emit_json, new_address, print_table, service
from benchmarks.slow_env import STEP_MS_ENV
from titan_rl.clients.buffer import BufferClient
from titan_rl.config import load_config

ENV = "benchmarks.slow_env:SlowCartPole-v1"
WORKERS, ENVS = 2, 8


def measure(replicas: int, learner_on: bool, window_s: float, env: dict[str, str], timeout_s: float = 180.0) -> dict[str, float]:
    buffer_port, buffer_address = new_address()
    trainer_port, trainer_address = new_address()
    dead_port, _ = new_address()
    # keys the services share (titan_rl/shared_keys.py) take the same values in all of them
    common = ["--config", CONFIG, f"rollout_server.env_name={ENV}", "budget.max_env_steps=100000000", "budget.target_eval_return=null"]
    common += [f"buffer_server.port={buffer_port}", f"trainer_server.port={trainer_port}"]
    batch_size = load_config(CONFIG).train.batch_size
    with contextlib.ExitStack() as stack:
        run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="actor_scaling-"))
        stack.enter_context(service("titan_rl.buffer", [*common, *([] if learner_on else [NO_RATE_LIMIT])], buffer_address, env))
        trainer_args = [
            *common,
            *([] if learner_on else [f"buffer_server.port={dead_port}"]),
            "logging.console=false",
            "logging.video=false",
            f"logging.run_dir={run_dir}",
            f"logging.checkpoint_path={run_dir}/checkpoint.pth",
        ]
        stack.enter_context(service("titan_rl.trainer", trainer_args, trainer_address, env))
        for replica in range(replicas):
            port, address = new_address()
            args = [*common, f"rollout_server.port={port}", f"rollout_server.replica_id={replica}"]
            args += [f"rollout_server.num_workers={WORKERS}", f"rollout_server.envs_per_worker={ENVS}"]
            stack.enter_context(service("titan_rl.rollout", args, address, env))
        buffer = stack.enter_context(contextlib.closing(BufferClient(buffer_address)))
        deadline = time.monotonic() + timeout_s

        def begun() -> bool:
            sources = buffer.sources()
            return sources is not None and len(sources.sources) == replicas and (not learner_on or buffer.info().sampled_rows_total > 0)

        while not begun():
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every replica stored data (or the learner never began) within {timeout_s:.0f} s")
            time.sleep(0.2)
        time.sleep(2.0)
        first, t0 = buffer.info(), time.monotonic()
        time.sleep(window_s)
        last, t1 = buffer.info(), time.monotonic()
    return {
        "env_steps_per_s": (last.env_steps_total - first.env_steps_total) / (t1 - t0),
        "updates_per_s": (last.sampled_rows_total - first.sampled_rows_total) / batch_size / (t1 - t0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--step-ms", type=float, default=1.0, help="sleep per env step (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="1 and 2 replicas, 3 s windows: a smoke test")
    args = parser.parse_args()
    replicas, window_s = ([1, 2], 3.0) if args.quick else (args.replicas, 10.0)
    env = {STEP_MS_ENV: str(args.step_ms), "WANDB_MODE": "disabled"}
    os.environ.update(env)  # the one-env ceiling below uses it too
    mode = QUICK_MODE if args.quick else f"{window_s:.0f} s windows"
    print(f"actor scaling, {datetime.date.today()}, {platform.node()} ({os.cpu_count()} cores), {args.step_ms:g} ms per env step; {mode}")
    ceiling = 1000 / args.step_ms * WORKERS  # per replica: a worker's envs step one after another, one per step_ms
    rows, results = [], []
    for learner_on in (False, True):
        for r in replicas:
            m = measure(r, learner_on, window_s, env)
            results.append({"replicas": r, "learner": learner_on, **m})
            share = m["env_steps_per_s"] / (r * ceiling)
            updates = f"{m['updates_per_s']:,.0f}" if learner_on else "-"
            rows.append(["on" if learner_on else "off", r, r * WORKERS, f"{m['env_steps_per_s']:,.0f}", f"{share:.2f}", updates])
    print_table(["learner", "replicas", "workers", "env steps/s stored", "of the sleep-bound ceiling", "updates/s"], rows)
    emit_json("actor_scaling", args.quick, step_ms=args.step_ms, workers_per_replica=WORKERS, envs_per_worker=ENVS, results=results)


if __name__ == "__main__":
    main()
