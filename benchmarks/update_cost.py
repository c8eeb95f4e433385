"""One learner update of a config, eager against `torch.compile`: would compiling the loss pay?

On two cores both TITAN-RL and its baselines are bound by the learner's update (docs/results.md,
"What limits each figure"), so a cheaper update is the one lever that shortens every run. This
builds the config's algorithm and policy twice, as the trainer does (one torch thread), and
updates both from the same random batches of the env's shapes: one as shipped, one whose `loss`
(forward, and through AOTAutograd the backward) is compiled by `torch.compile`. The two alternate
in blocks of `--block-s` seconds; the ratio is the median of neighbouring blocks'. It prints the
compile time (the compiled learner's first updates, on inductor's on-disk cache as this machine
has it) and how many updates the saving needs to pay it back, against the updates the config's
budget does.

    .venv/bin/python -m benchmarks.update_cost --config config/acrobot.yaml [section.key=value ...]

Off-policy configs only (the learner's `update` takes a replay batch of obs, action, reward,
next_obs, terminated).
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from benchmarks.common import alternate_runs, emit_json, paired_ratio, print_table, updates_rate
from titan_rl.algorithm import Batch, Learner, to_batch
from titan_rl.config import load_config
from titan_rl.envs import check_env_spaces
from titan_rl.registry import build_algorithm, build_policy

BATCHES = 64  # distinct batches cycled through: enough that no cache holds them all


def random_batches(obs_shape: tuple[int, ...], obs_dtype: np.dtype, num_actions: int, batch_size: int, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)

    def observations() -> np.ndarray:
        if np.issubdtype(obs_dtype, np.floating):
            return rng.standard_normal((batch_size, *obs_shape)).astype(obs_dtype)
        return rng.integers(0, 2, (batch_size, *obs_shape)).astype(obs_dtype)  # MinAtar's boolean channels

    return [
        to_batch(
            {
                "obs": observations(),
                "next_obs": observations(),
                "action": rng.integers(0, num_actions, batch_size).astype(np.int64),
                "reward": rng.standard_normal(batch_size).astype(np.float32),
                "terminated": rng.random(batch_size) < 0.05,
                "truncated": np.zeros(batch_size, dtype=bool),
            }
        )
        for _ in range(BATCHES)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/cartpole.yaml")
    parser.add_argument("--block-s", type=float, default=2.0, help="seconds of updates per block")
    parser.add_argument("--reps", type=int, default=10, help="blocks of each learner, alternating")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for `bash run.sh`")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    obs_shape, obs_dtype, num_actions = check_env_spaces(cfg)
    batches = random_batches(obs_shape, obs_dtype, num_actions, cfg.train.batch_size)
    learners: dict[str, Learner] = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(cfg.seed)
        learners[name] = build_algorithm(cfg).make_learner(build_policy(cfg))
    compiled = learners["compiled"]
    compiled.loss = torch.compile(compiled.loss)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    for batch in batches[:3]:  # the first calls compile; later ones run the cached graph
        compiled.update(batch)
    compile_s = time.perf_counter() - t0

    def block(learner: Learner) -> float:
        return updates_rate(learner, itertools.cycle(batches).__next__, args.block_s, warmup_s=0.1)

    runs = {name: lambda learner=learner: block(learner) for name, learner in learners.items()}
    rates = alternate_runs(runs, args.reps)
    ratio = paired_ratio(rates, "eager", "compiled")  # compiled time per update / eager time per update
    ms = {name: 1e3 / float(np.median(values)) for name, values in rates.items()}
    saved_ms = ms["eager"] - ms["compiled"]
    budget_updates = int(cfg.budget.max_env_steps * cfg.train.updates_per_env_step)
    payback = round(compile_s * 1e3 / saved_ms) if saved_ms > 0 else None  # None: compiling never pays

    hidden = cfg.policy.kwargs.get("hidden_sizes")
    network = f"{cfg.policy.path} {hidden}" if hidden else cfg.policy.path
    print(f"\nupdate cost: {args.config}, {network}, batch {cfg.train.batch_size}, 1 torch thread")
    print(f"median of {args.reps} alternating blocks of {args.block_s:g} s each\n")
    rows = [["eager (as shipped)", f"{ms['eager']:.3f}"], ["torch.compile'd loss", f"{ms['compiled']:.3f}"]]
    print_table(["learner", "ms per update"], rows)
    print(f"\ncompiled / eager time per update: {ratio:.2f}x")
    pays_back = f"after {payback:,} updates" if payback else "never"
    print(f"compile (first 3 updates): {compile_s:.1f} s; pays back {pays_back} (the budget does {budget_updates:,})")
    emit_json("update_cost", False, ms_per_update=ms, ratio=ratio, compile_s=compile_s, payback_updates=payback, budget=budget_updates)


if __name__ == "__main__":
    main()
