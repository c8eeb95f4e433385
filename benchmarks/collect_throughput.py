"""Collection throughput: env steps/s that land in the buffer with the rollout service, learner off.

Real subprocesses: `python -m titan_rl.buffer` (rate limiting effectively off), `python -m titan_rl.trainer`
(W&B disabled, no console) serving the initial weights on WatchPolicy, and `python -m titan_rl.rollout`
restarted for each (num_workers, envs_per_worker) in {1, 2} x {8, 32, 128}. The learner is kept off by
pointing the trainer's buffer address at a port where nothing listens: it serves weights and never
samples, so the buffer does collection work only. Measured: growth of the buffer's env_steps_total
(BufferClient.info(): the env steps its stored records cover, as each chunk reports them; n-step
records number about the same) over a 5 s window, once every worker has reported steps and 1 s has passed.

Baseline: one process, one core, no gRPC: gymnasium.make_vec("CartPole-v1", num_envs=n), a batched forward
of the config's policy (SimplePolicy, same hidden sizes, one torch thread) and epsilon-greedy, counting
real transitions (the step after an episode ends only resets, as in the actors). Both sides act with
epsilon = 1 (algorithm.config.epsilon_start = epsilon_final = 1; the greedy forward still runs every
step), so episode lengths, and with them the per-step cost of resets, do not depend on the random
network weights.
Baseline and rollout alternate, 3 repetitions, median. Per-core ratio: rollout steps/s divided by
min(num_workers, 2) cores, over the baseline at the same envs_per_worker.
Target: per-core ratio >= 0.5x the raw loop, in every configuration (the verdict uses the worst).

    .venv/bin/python -m benchmarks.collect_throughput [--quick]
"""

from __future__ import annotations

import contextlib
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch

from benchmarks.common import (
    CONFIG,
    HOST,
    alternate,
    buffer_service,
    describe_mode,
    emit_json,
    new_address,
    parse_args,
    print_table,
    rate_for,
    service,
    verdict,
)
from titan_rl.clients.buffer import BufferClient
from titan_rl.clients.rollout import RolloutClient
from titan_rl.config import Config, load_config
from titan_rl.registry import build_policy

TARGET = 0.5
EPSILON = 1.0
CORES = 2


def raw_loop_rate(cfg: Config, num_envs: int, duration_s: float) -> float:
    """Transitions/s of the single-process act-step loop."""
    env = gym.make_vec(cfg.rollout_server.env_name, num_envs=num_envs)
    policy = build_policy(cfg).eval()
    rng = np.random.default_rng(0)
    n_actions = int(env.single_action_space.n)
    obs, _ = env.reset(seed=0)
    resetting = np.zeros(num_envs, dtype=bool)  # rows whose next step only resets the env

    def step() -> int:
        nonlocal obs, resetting
        with torch.no_grad():
            greedy = policy(torch.as_tensor(obs)).argmax(dim=1).numpy()
        explore = rng.random(num_envs) < EPSILON
        actions = np.where(explore, rng.integers(0, n_actions, num_envs), greedy)
        obs, _, terminated, truncated, _ = env.step(actions)
        transitions = num_envs - int(resetting.sum())
        resetting = terminated | truncated
        return transitions

    try:
        return rate_for(step, duration_s)
    finally:
        env.close()


def rollout_rate(
    common: list[str], buffer: BufferClient, workers: int, envs: int, warmup_s: float, duration_s: float, timeout_s: float = 120.0
) -> float:
    """Env steps/s landing in the buffer while a rollout service with `workers` x `envs` envs runs."""
    port, address = new_address()
    args = ["--port", str(port), *common, f"rollout_server.num_workers={workers}", f"rollout_server.envs_per_worker={envs}"]
    with service("titan_rl.rollout", args, address), contextlib.closing(RolloutClient(address)) as rollout:
        deadline = time.monotonic() + timeout_s
        while (stats := rollout.stats()) is None or any(w.env_steps == 0 for w in stats.workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"rollout workers did not all report env steps within {timeout_s:.0f} s")
            time.sleep(0.1)
        time.sleep(warmup_s)
        i0, t0 = buffer.info().env_steps_total, time.monotonic()
        time.sleep(duration_s)
        i1, t1 = buffer.info().env_steps_total, time.monotonic()
    return (i1 - i0) / (t1 - t0)


def main() -> None:
    args = parse_args(__doc__)
    grid = [(1, 8)] if args.quick else [(w, e) for w in (1, 2) for e in (8, 32, 128)]
    warmup_s, duration_s, reps = (0.5, 1.5, 1) if args.quick else (1.0, 5.0, 3)
    torch.set_num_threads(1)
    cfg = load_config(CONFIG)
    buffer_port, buffer_address = new_address()
    trainer_port, trainer_address = new_address()
    dead_port, _ = new_address()  # nothing listens here: the trainer never gets a batch
    # keys every service reads (titan_rl/shared_keys.py): the same values in all three
    exploration = [f"algorithm.config.epsilon_{end}={EPSILON}" for end in ("start", "final")]
    exploration.append("algorithm.config.epsilon_decay_env_steps=0")
    common = ["--config", CONFIG, f"buffer_server.port={buffer_port}", f"trainer_server.port={trainer_port}", *exploration]
    results = []
    with contextlib.ExitStack() as stack:
        run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="collect_throughput-"))
        stack.enter_context(buffer_service(buffer_port, *exploration))
        trainer_args = [
            "--config",
            CONFIG,
            "--host",
            HOST,
            "--port",
            str(trainer_port),
            f"buffer_server.port={dead_port}",
            "logging.console=false",
            f"logging.run_dir={run_dir}",
            f"logging.checkpoint_path={run_dir}/checkpoint.pth",
            "budget.max_wall_s=0",
            *exploration,
        ]
        stack.enter_context(service("titan_rl.trainer", trainer_args, trainer_address, env={"WANDB_MODE": "disabled"}))
        buffer = stack.enter_context(contextlib.closing(BufferClient(buffer_address)))
        for workers, envs in grid:
            r = alternate(
                {
                    "raw_loop": lambda envs=envs: raw_loop_rate(cfg, envs, duration_s),
                    "rollout": lambda workers=workers, envs=envs: rollout_rate(common, buffer, workers, envs, warmup_s, duration_s),
                },
                reps,
            )
            cores = min(workers, CORES)
            ratio = r["rollout"] / cores / r["raw_loop"]
            results.append({"num_workers": workers, "envs_per_worker": envs, **r, "cores": cores, "ratio_per_core": ratio})

    mode = describe_mode(args.quick, reps, duration_s)
    print(f"\ncollection throughput, transitions/s landing in the buffer, learner off, epsilon {EPSILON:g}; {mode}")
    print_table(
        ["workers", "envs/worker", "raw loop (1 core)", "rollout service", "cores", "per core / raw"],
        [[r["num_workers"], r["envs_per_worker"], r["raw_loop"], r["rollout"], r["cores"], f"{r['ratio_per_core']:.2f}"] for r in results],
    )
    worst = min(r["ratio_per_core"] for r in results)
    print()
    met = verdict("worst per-core ratio to the raw loop", worst, TARGET)
    emit_json("collect_throughput", args.quick, results=results, worst_ratio=worst, target=TARGET, met=met)


if __name__ == "__main__":
    main()
