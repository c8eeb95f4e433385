"""Time to solve CartPole-v1: TITAN-RL (three services, as run.sh starts them) vs the same algorithm in
one process (benchmarks/inproc_twin.py) vs Stable-Baselines3 DQN.

Every side: greedy evaluation of 20 episodes on separate envs every 2,500 env steps, and 20 more
where the first 20 would beat the best so far (the mean over 40 then counts:
`titan_rl.evaluation.evaluate_confirmed`); budget 50,000 env steps. Per seed: process wall-clock from
launch to the first eval mean >= 475, env steps at that point, and the final policy's eval (20 fresh
episodes).
TITAN-RL runs with its default config and W&B offline, as `bash run.sh` does, but trains the
whole budget (target_eval_return=null) so the final figures are comparable.
The twin runs config/cartpole.yaml's algorithm and hyperparameters, evaluated by the same
`Evaluator` in a process of its own. The sides take turns going first, seed by seed.

Baselines: the twin, and SB3 with the rl-baselines3-zoo hyperparameters (benchmarks/sb3_dqn.py).
Targets: median TITAN-RL time to solve <= 1.0x the twin's and <= 0.5x SB3's; TITAN-RL's checkpoint
>= 475 in every seed.

    .venv/bin/pip install -r benchmarks/requirements.txt
    .venv/bin/python -m benchmarks.solve_time --seeds 0 1 2 3 4 5 6 7 8 9
    .venv/bin/python -m benchmarks.solve_time --only titan --seeds 0 1 -- algorithm.config.lr_final=0.0002

`--keep DIR` keeps every run's files there (TITAN-RL's run folders with their metrics.jsonl and
checkpoints, the one-process sides' JSON lines) for reading the runs afterwards; without it they go
to a temporary folder removed at the end.

Overrides (after `--`) apply to TITAN-RL and the twin, never to SB3's zoo settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from titan_rl.checkpoint import load_checkpoint, policy_from_checkpoint
from titan_rl.evaluation import evaluate
from titan_rl.scratch import run_scratch_dir

SOLVED = 475.0
REPO = Path(__file__).resolve().parent.parent


def first_solved(evals: list[dict], launched: float) -> tuple[float | None, int | None]:
    for row in evals:
        if row["mean_return"] >= SOLVED:
            return row["time"] - launched, row["env_steps"]
    return None, None


def eval_checkpoint(path: Path, episodes: int, seed: int) -> float:
    policy, cfg, algorithm = policy_from_checkpoint(load_checkpoint(path))
    returns = evaluate(lambda obs: algorithm.greedy_actions(policy, obs), cfg.rollout_server.env_name, episodes, seed)
    return float(np.mean(returns))


def run_titan(seed: int, budget: int, work: Path, final_seed: int, overrides: list[str]) -> dict:
    name = f"titan-seed{seed}"
    ckpt = work / f"{name}.pth"
    cmd = [
        sys.executable,
        "-m",
        "titan_rl.launch",
        "--seed",
        str(seed),
        f"budget.max_env_steps={budget}",
        "budget.target_eval_return=null",
        "eval.interval_env_steps=2500",
        "eval.episodes=20",
        "logging.console=false",
        f"logging.run_dir={work}",
        f"logging.run_name={name}",
        f"logging.checkpoint_path={ckpt}",
        *overrides,
    ]
    launched = time.time()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.time() - launched
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    evals = [
        {"time": r["charts/time"], "env_steps": r["env_steps"], "mean_return": r["eval/mean_return"]}
        for r in rows
        if "eval/mean_return" in r
    ]
    solved_s, solved_steps = first_solved(evals, launched)
    # the loop logs right after its first update (then every logging.log_interval_s)
    first_update = next((r["charts/time"] - launched for r in rows if r.get("charts/updates", 0) >= 1), None)
    return {
        "solved_s": solved_s,
        "solved_steps": solved_steps,
        **({"first_update_s": first_update} if first_update is not None else {}),
        "wall_s": wall,
        "final": eval_checkpoint(ckpt, 20, final_seed),
        "final_last": eval_checkpoint(ckpt.with_name(f"{ckpt.stem}_last.pth"), 20, final_seed),
    }


def run_module(module: str, name: str, seed: int, budget: int, work: Path, final_seed: int, overrides: Sequence[str] = ()) -> dict:
    """A one-process side (benchmarks.sb3_dqn or benchmarks.inproc_twin) writing eval rows to a JSON-lines file."""
    out = work / f"{name}-seed{seed}.jsonl"
    cmd = [sys.executable, "-m", module, "--seed", str(seed), "--budget", str(budget), "--out", str(out), "--final-seed", str(final_seed)]
    cmd += overrides
    launched = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.time() - launched
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    solved_s, solved_steps = first_solved([r for r in rows if "mean_return" in r], launched)
    result = {"solved_s": solved_s, "solved_steps": solved_steps, "wall_s": wall, "final": rows[-1]["final_mean_return"]}
    first_update = [r["time"] for r in rows if "first_update" in r]  # the twin says when it first learned
    return result | ({"first_update_s": first_update[0] - launched} if first_update else {})


def run_sb3(seed: int, budget: int, work: Path, final_seed: int, overrides: list[str]) -> dict:
    return run_module("benchmarks.sb3_dqn", "sb3", seed, budget, work, final_seed)  # the zoo's settings: no overrides


def run_twin(seed: int, budget: int, work: Path, final_seed: int, overrides: list[str]) -> dict:
    return run_module("benchmarks.inproc_twin", "twin", seed, budget, work, final_seed, overrides)


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def median_solved(results: list[dict]) -> float:
    """Median time to solve; a seed that never solved counts as infinitely slow."""
    return statistics.median([r["solved_s"] if r["solved_s"] is not None else float("inf") for r in results])


@contextlib.contextmanager
def work_dir(keep: Path | None) -> Iterator[Path]:
    """Where the runs write: `keep` (created; refused unless empty, so that no earlier run's files
    mix with these), or a temporary folder removed afterwards."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="solve_time-") as tmp:
            yield Path(tmp)
        return
    keep = keep.resolve()  # the runs start in the repository's root, wherever this was started
    keep.mkdir(parents=True, exist_ok=True)
    if any(keep.iterdir()):
        raise SystemExit(f"--keep {keep}: not empty; name a new folder")
    yield keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=50_000)
    parser.add_argument("--only", choices=["titan", "twin", "sb3"], nargs="+", help="run these sides only")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep every run's files in this new or empty folder")
    parser.add_argument("overrides", nargs="*", help="section.key=value for titan and the twin, as for run.sh")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"titan": [], "twin": [], "sb3": []}
    runners = {"titan": run_titan, "twin": run_twin, "sb3": run_sb3}
    with work_dir(args.keep) as work, run_scratch_dir():  # the twin's and SB3's W&B and torch files too
        for i, seed in enumerate(args.seeds):
            sides = list(runners)
            for side in sides[i % 3 :] + sides[: i % 3]:
                if args.only is None or side in args.only:
                    r = runners[side](seed, args.budget, work, final_seed=10_000 + seed, overrides=args.overrides)
                    results[side].append({"seed": seed, **r})
                    print(
                        f"{side:5s} seed {seed}: solved at {fmt(r['solved_s'])}s / {fmt(r['solved_steps'], 'd')} env steps, "
                        f"final eval {r['final']:.1f}"
                        + (f" (last policy {r['final_last']:.1f})" if "final_last" in r else "")
                        + (f", first update at {r['first_update_s']:.1f}s" if "first_update_s" in r else "")
                        + f", run {r['wall_s']:.1f}s",
                        flush=True,
                    )
    print("\nside   median solve s   median solve steps   final >= 475   median first update s")
    for side, rs in results.items():
        if rs:
            steps = statistics.median([r["solved_steps"] if r["solved_steps"] is not None else float("inf") for r in rs])
            first = [r["first_update_s"] for r in rs if "first_update_s" in r]
            solved = f"{sum(r['final'] >= SOLVED for r in rs)}/{len(rs)}"
            first_s = fmt(statistics.median(first)) if first else "-"
            print(f"{side:5s}  {median_solved(rs):14.1f}   {steps:18.0f}   {solved:>12s}   {first_s:>21s}")
    every_seed = all(r["final"] >= SOLVED for r in results["titan"])
    for baseline, target in (("twin", 1.0), ("sb3", 0.5)):
        if results["titan"] and results[baseline]:
            ratio = median_solved(results["titan"]) / median_solved(results[baseline])
            met = "MET" if ratio <= target and every_seed else "NOT MET"
            print(f"ratio titan/{baseline} median time to solve: {ratio:.2f} (target <= {target:.2f}, final >= 475 every seed): {met}")
    print(json.dumps({"benchmark": "solve_time", "overrides": args.overrides, **results}))


if __name__ == "__main__":
    main()
