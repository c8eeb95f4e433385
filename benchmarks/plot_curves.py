"""Learning curves of a multi-seed set (benchmarks/seeds.py): greedy evaluation return against env
steps and against wall-clock, the mean over seeds and a band of ± one standard deviation.

    python -m benchmarks.plot_curves runs/results/acrobot --out docs/img/acrobot.png [--title Acrobot-v1]

Reads every `<dir>/seed*/metrics.jsonl` (the trainer's `eval/mean_return` rows). Each seed's
curve is held constant between its evaluations and the mean is taken where every seed has one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

GRID_POINTS = 200


def eval_curve(metrics_path: Path, x_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, eval return) of every evaluation in one run's metrics.jsonl."""
    xs, ys = [], []
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "eval/mean_return" in row:
            xs.append(row["env_steps"] if x_key == "env_steps" else row["charts/wall_s"])
            ys.append(row["eval/mean_return"])
    order = np.argsort(xs, kind="stable")
    return np.asarray(xs, float)[order], np.asarray(ys, float)[order]


def band(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid, mean and std over seeds, each curve a step function of its evaluations."""
    start = max(x[0] for x, _ in curves)
    stop = min(x[-1] for x, _ in curves)
    grid = np.linspace(start, stop, GRID_POINTS)
    held = np.stack([y[np.searchsorted(x, grid, side="right") - 1] for x, y in curves])
    return grid, held.mean(axis=0), held.std(axis=0)


def metrics_files(results_dir: Path) -> list[Path]:
    files = sorted(results_dir.glob("seed*/metrics.jsonl"))
    if not files:
        raise SystemExit(f"{results_dir}: no seed*/metrics.jsonl (run benchmarks/seeds.py first)")
    return files


def plot(results_dir: Path, out: Path, title: str) -> None:
    files = metrics_files(results_dir)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, x_key, label in ((axes[0], "env_steps", "env steps"), (axes[1], "wall_s", "wall-clock (s)")):
        curves = [c for c in (eval_curve(f, x_key) for f in files) if len(c[0])]
        for x, y in curves:
            axis.plot(x, y, color="grey", alpha=0.3, linewidth=0.8)
        grid, mean, std = band(curves)
        axis.plot(grid, mean, color="C0", label=f"mean of {len(curves)} seeds")
        axis.fill_between(grid, mean - std, mean + std, color="C0", alpha=0.25, label="± 1 std")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("greedy eval return (20 episodes)")
    axes[0].legend(loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    print(f"{out}: {len(files)} seeds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="a benchmarks/seeds.py output folder")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="", help="default: the folder's name")
    args = parser.parse_args(argv)
    plot(args.results_dir, args.out, args.title or args.results_dir.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
