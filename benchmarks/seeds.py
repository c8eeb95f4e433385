"""Train one config over several seeds and score each run: one row of docs/results.md.

    python -m benchmarks.seeds --config config/acrobot.yaml --seeds 5 [section.key=value ...]

Each seed is a whole `bash run.sh` run (`python -m titan_rl.launch`: three services), one after
the other, its files under `--out` (default `runs/results/<config stem>/seed<N>/`). The kept
(best) checkpoint and the last one of every run are then scored on `--episodes` fresh greedy
episodes, reset with seeds no training evaluation used. Each run's figures go to
`<out>/seed<N>/score.json`; the summary (mean ± std over seeds) is printed and written to
`<out>/summary.json`. A seed whose `score.json` exists is not run again, so an interrupted set
continues where it stopped (`--rerun` runs them all anew). Curves: `python -m titan_rl.plot <out>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from titan_rl.checkpoint import last_path, load_checkpoint, policy_from_checkpoint
from titan_rl.config import load_config
from titan_rl.evaluation import evaluate

REPO = Path(__file__).resolve().parent.parent
SCORING_SEED = 1_000_000  # far from the seeds training evaluations reset with


def score_checkpoint(path: Path, episodes: int, seed: int) -> list[float]:
    """Returns of `episodes` greedy episodes of the policy stored at `path`."""
    network, cfg, algorithm = policy_from_checkpoint(load_checkpoint(path))
    return evaluate(lambda obs: algorithm.greedy_actions(network, obs), cfg.rollout_server.env_name, episodes, seed)


def train(config: str, seed: int, run_dir: Path, overrides: list[str]) -> float:
    """Run one seed to its budget; its wall-clock seconds, start-up and shutdown included."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    args = [
        f"seed={seed}",
        f"logging.run_dir={run_dir.parent}",
        f"logging.run_name={run_dir.name}",
        f"logging.checkpoint_path={run_dir / 'checkpoint.pth'}",
        "logging.console=false",
        *overrides,
    ]
    started = time.monotonic()
    with open(run_dir / "launch.log", "w") as log:
        result = subprocess.run(
            [sys.executable, "-m", "titan_rl.launch", "--config", config, *args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")},
        )
    if result.returncode != 0:
        raise SystemExit(f"seed {seed}: the run failed (exit {result.returncode}); see {run_dir / 'launch.log'}")
    return time.monotonic() - started


def run_seed(config: str, seed: int, run_dir: Path, overrides: list[str], episodes: int) -> dict[str, Any]:
    wall_s = train(config, seed, run_dir, overrides)
    best_path = run_dir / "checkpoint.pth"
    counters = load_checkpoint(last_path(best_path))["counters"]
    best = score_checkpoint(best_path, episodes, SCORING_SEED + 1000 * seed)
    last = score_checkpoint(last_path(best_path), episodes, SCORING_SEED + 1000 * seed)
    score = {
        "seed": seed,
        "best_mean": statistics.fmean(best),
        "best_returns": best,
        "last_mean": statistics.fmean(last),
        "last_returns": last,
        "env_steps": int(counters["env_steps"]),
        "updates": int(counters["updates"]),
        "wall_s": wall_s,
    }
    (run_dir / "score.json").write_text(json.dumps(score, indent=1))
    return score


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {spread:.1f}"


def summarize(config: str, scores: list[dict[str, Any]]) -> dict[str, Any]:
    best = [s["best_mean"] for s in scores]
    last = [s["last_mean"] for s in scores]
    return {
        "config": config,
        "seeds": [s["seed"] for s in scores],
        "best": mean_std(best),
        "last": mean_std(last),
        "best_per_seed": best,
        "last_per_seed": last,
        "env_steps": mean_std([s["env_steps"] for s in scores]),
        "wall_s": mean_std([s["wall_s"] for s in scores]),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the YAML to train, e.g. config/acrobot.yaml")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (default 5)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=20, help="greedy episodes per checkpoint (default 20)")
    parser.add_argument("--out", type=Path, help="default runs/results/<config stem>")
    parser.add_argument("--rerun", action="store_true", help="run every seed anew, even those already scored")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for run.sh")
    args = parser.parse_args(argv)
    load_config(args.config, args.overrides)  # a bad key fails here, before any run starts
    out = args.out or REPO / "runs" / "results" / Path(args.config).stem
    scores = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        run_dir = out / f"seed{seed}"
        done = run_dir / "score.json"
        if done.exists() and not args.rerun:
            score = json.loads(done.read_text())
        else:
            score = run_seed(args.config, seed, run_dir, args.overrides, args.episodes)
        print(
            f"seed {seed}: best {score['best_mean']:.1f}, last {score['last_mean']:.1f}, "
            f"{score['env_steps']} env steps, {score['wall_s']:.0f} s",
            flush=True,
        )
        scores.append(score)
    summary = summarize(args.config, scores)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{args.config}: best {summary['best']}, last {summary['last']}, {summary['env_steps']} env steps, {summary['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
