"""TITAN-RL's algorithm in one process: the baseline that says what the three services cost.

A CleanRL-style loop over the same pieces the services run: the config's algorithm plugin (its
actor, n-step adder and learner), one vector env with as many envs as all rollout workers
together, a replay `Table` in memory, and the trainer's `Evaluator` (greedy episodes in a process
of its own, every `eval.interval_env_steps`). Acting and learning alternate on one thread:
after each vector step the learner catches up to `train.updates_per_env_step` updates per env
step once `train.min_buffer_size` records are stored, and the actors act with the learner's own
network (the freshest weights, no publishing).

Learning's start appends {"time", "first_update": env_steps} to `--out`, every evaluation
{"time", "env_steps", "mean_return", "episodes"} (the format of benchmarks/sb3_dqn.py; 40 episodes
where the first 20 would beat the best, as the trainer evaluates); at the end the final policy is
scored on fresh episodes and a last line {"final_mean_return", "final_returns", "wall_s"} is
appended. Run by benchmarks/solve_time.py.

    python -m benchmarks.inproc_twin --seed 0 --budget 50000 --out twin.jsonl [section.key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from titan_rl.algorithm import to_batch
from titan_rl.buffer.table import Table
from titan_rl.config import load_config
from titan_rl.evaluation import EvalJob, EvalResult, Evaluator, confirmation_bar, eval_seed, evaluate, snapshot
from titan_rl.registry import build_algorithm, build_policy
from titan_rl.rollout.actor import VectorActor

CONFIG = "config/cartpole.yaml"
UNLIMITED = 10**15  # the loop keeps the update ratio itself: the table's rate limiter never waits


def train(config: str, overrides: list[str], out: str, final_seed: int) -> None:
    started = time.monotonic()
    cfg = load_config(config, overrides)
    evaluator = Evaluator(cfg, cfg.eval.episodes, start_method="fork")
    evaluator.start()  # first, as the trainer does: a fork before any torch work
    torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.seed)
    algorithm = build_algorithm(cfg)
    network = build_policy(cfg)
    algorithm.check_network(network)
    learner = algorithm.make_learner(network)
    spec = algorithm.table()
    table = Table(dataclasses.replace(spec, slack_items=UNLIMITED), algorithm.record_spec(), seed=cfg.seed)
    num_envs = cfg.rollout_server.num_workers * cfg.rollout_server.envs_per_worker
    actor = algorithm.make_actor(network, 0, seed=cfg.seed)
    envs = VectorActor(cfg.rollout_server.env_name, num_envs, actor, algorithm.make_adder(num_envs), seed=cfg.seed)
    t, e = cfg.train, cfg.eval
    env_steps, owed_updates, evals, best = 0, 0.0, 0, None
    next_eval = e.interval_env_steps

    def record(result: EvalResult) -> None:
        nonlocal best
        mean_return = float(np.mean(result.returns))
        best = mean_return if best is None else max(best, mean_return)
        row = {"time": time.time(), "env_steps": result.job.env_steps, "mean_return": mean_return, "episodes": len(result.returns)}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")

    try:
        while env_steps < cfg.budget.max_env_steps:
            actor.env_steps = env_steps  # the epsilon schedule's clock, as weights carry it to the services' actors
            step = envs.step()
            env_steps += step.env_steps
            if len(step.records[next(iter(step.records))]):
                table.insert_fields(step.records, env_steps=step.env_steps)
            if table.info().size >= t.min_buffer_size:
                owed_updates += t.updates_per_env_step * step.env_steps
                while owed_updates >= 1:
                    rows = table.sample(t.batch_size)
                    batch = to_batch(rows.fields(), rows.keys, rows.weights)
                    learner.env_steps = env_steps
                    learner.update(batch)
                    if learner.updates == 1:  # stamped after it, as the trainer logs its first update
                        with open(out, "a") as f:
                            f.write(json.dumps({"time": time.time(), "first_update": env_steps}) + "\n")
                    if batch.new_priorities is not None:
                        table.update_priorities(batch.keys, batch.new_priorities)
                    owed_updates -= 1
            for result in evaluator.results():
                record(result)
            if env_steps >= next_eval and evaluator.idle:
                seed = eval_seed(cfg.seed, evals, e.episodes)  # the trainer's seeds
                confirm = confirmation_bar(best, None)  # the trainer's rule; the twin stops at no target
                evaluator.submit(EvalJob(env_steps, snapshot(learner.state_dict()), seed, seed + e.episodes, confirm))
                evals += 1
                next_eval = (env_steps // e.interval_env_steps + 1) * e.interval_env_steps
        for result in evaluator.results(wait_s=120):
            record(result)
        wall_s = time.monotonic() - started
        final = evaluate(lambda obs: algorithm.greedy_actions(network, obs), cfg.rollout_server.env_name, e.episodes, final_seed)
        with open(out, "a") as f:
            f.write(json.dumps({"final_mean_return": float(np.mean(final)), "final_returns": final, "wall_s": wall_s}) + "\n")
    finally:
        evaluator.close()
        envs.close()
        table.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=50_000, help="env steps")
    parser.add_argument("--final-seed", type=int, default=777)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for run.sh")
    args = parser.parse_args(argv)
    overrides = [f"seed={args.seed}", f"budget.max_env_steps={args.budget}", *args.overrides]
    train(args.config, overrides, args.out, args.final_seed)


if __name__ == "__main__":
    main()
