"""Learning curves of one run or many: return against env steps and against wall-clock.

    python -m titan_rl.plot RUN_DIR... [--out PNG] [--title T]

A RUN_DIR is one run's folder (`runs/<run_name>/`, holding `metrics.jsonl`) or a folder of runs
(`*/metrics.jsonl` one level below, as benchmarks/seeds.py writes them). Every run found is drawn
as a thin grey line and, with two or more, their mean with a band of ± one standard deviation;
each run's curve is held constant between its points and the mean is taken where all have one.
The return is the greedy evaluation's (`eval/mean_return`); a run without evaluations falls back
to the actors' training return (`charts/episodic_return`), averaged apart from the evaluated runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GRID_POINTS = 200
EVAL, TRAIN = "eval/mean_return", "charts/episodic_return"
LABELS = {EVAL: "greedy eval return", TRAIN: "training return (no eval rows; exploring actors)"}
X_AXES = (("env_steps", "env steps"), ("wall_s", "wall-clock (s)"))


def read_rows(metrics_path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line cut short by a running trainer is skipped."""
    rows = []
    for line in metrics_path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def eval_curve(metrics_path: Path, x_key: str, y_key: str = EVAL) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every row with `y_key`, sorted by x; `x_key` is "env_steps" or "wall_s" (charts/wall_s)."""
    x_field = "charts/wall_s" if x_key == "wall_s" else x_key
    points = [(row[x_field], row[y_key]) for row in read_rows(metrics_path) if x_field in row and y_key in row]
    xs, ys = np.asarray([p[0] for p in points], float), np.asarray([p[1] for p in points], float)
    order = np.argsort(xs, kind="stable")
    return xs[order], ys[order]


def run_metric(metrics_path: Path) -> str | None:
    """EVAL when the run has evaluation rows, else TRAIN when it has training returns, else None."""
    rows = read_rows(metrics_path)
    return next((key for key in (EVAL, TRAIN) if any(key in row for row in rows)), None)


def band(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid, mean and std over runs, each curve a step function of its points (empty if they share no range)."""
    start = max(x[0] for x, _ in curves)
    stop = min(x[-1] for x, _ in curves)
    if start > stop:
        return np.empty(0), np.empty(0), np.empty(0)
    grid = np.linspace(start, stop, GRID_POINTS)
    held = np.stack([y[np.searchsorted(x, grid, side="right") - 1] for x, y in curves])
    return grid, held.mean(axis=0), held.std(axis=0)


def metrics_files(run_dirs: Iterable[Path]) -> list[Path]:
    """Each folder's own metrics.jsonl, or else those of the runs one level below it."""
    files: list[Path] = []
    for run_dir in run_dirs:
        own = run_dir / "metrics.jsonl"
        for f in [own] if own.is_file() else sorted(run_dir.glob("*/metrics.jsonl")):
            if f not in files:
                files.append(f)
    return files


def default_title(run_dirs: Sequence[Path], files: Iterable[Path]) -> str:
    """The env name(s) the runs' config.yaml name, else the folder name(s)."""
    import yaml

    envs: list[str] = []
    for config in [f.parent / "config.yaml" for f in files] + [d / "config.yaml" for d in run_dirs]:
        try:
            env = (yaml.safe_load(config.read_text()) or {}).get("rollout_server", {}).get("env_name")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(env, str) and env not in envs:
            envs.append(env)
    return ", ".join(envs or [d.resolve().name for d in run_dirs])


def plot(files: Sequence[Path], out: Path, title: str) -> Figure:
    """Draw the runs of `files` that have returns into `out` (PNG, Agg: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: dict[str, list[Path]] = {EVAL: [], TRAIN: []}
    for f in files:
        if (metric := run_metric(f)) is not None:
            groups[metric].append(f)
    groups = {metric: runs for metric, runs in groups.items() if runs}
    figure = Figure(figsize=(11, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    for axis, (x_key, x_label) in zip(axes, X_AXES, strict=True):
        for color, (metric, runs) in zip(("C0", "C1"), groups.items(), strict=False):
            curves = [c for c in (eval_curve(f, x_key, metric) for f in runs) if len(c[0])]
            if len(curves) == 1:
                axis.plot(*curves[0], color=color, label=LABELS[metric])
                continue
            for x, y in curves:
                axis.plot(x, y, color="grey", alpha=0.3, linewidth=0.8)
            grid, mean, std = band(curves) if curves else (np.empty(0),) * 3
            if len(grid):
                axis.plot(grid, mean, color=color, label=f"{LABELS[metric]}: mean of {len(curves)} runs")
                axis.fill_between(grid, mean - std, mean + std, color=color, alpha=0.25, label="± 1 std")
        axis.set_xlabel(x_label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(LABELS[next(iter(groups))] if len(groups) == 1 else "return (see legend)")
    axes[0].legend(loc="lower right", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return figure


def main(argv: list[str] | None = None) -> int:
    """`titan-rl plot RUN_DIR... [--out PNG] [--title T]`: 0 once written, 2 when nothing has returns."""
    parser = argparse.ArgumentParser(prog="titan-rl plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's folder, or a folder of runs")
    parser.add_argument("--out", type=Path, metavar="PNG", help="image to write (default: <first RUN_DIR>/curves.png)")
    parser.add_argument("--title", metavar="T", help="default: the env name from the runs' config.yaml, else the folder name")
    args = parser.parse_args(argv)
    if missing := [str(d) for d in args.run_dirs if not d.is_dir()]:
        parser.error(f"no such folder: {', '.join(missing)}")
    if args.out is not None:
        from matplotlib.backend_bases import FigureCanvasBase

        if (kind := args.out.suffix.lower().lstrip(".")) not in (kinds := FigureCanvasBase.get_supported_filetypes()):
            parser.error(f"--out {args.out}: {kind or 'no'} file type; one of {', '.join('.' + k for k in sorted(kinds))}")
    files = metrics_files(args.run_dirs)
    if not any(run_metric(f) for f in files):
        folders = ", ".join(str(d) for d in args.run_dirs)
        print(f"titan-rl plot: no {EVAL} or {TRAIN} rows in any metrics.jsonl of {folders}", file=sys.stderr)
        return 2
    out = args.out or args.run_dirs[0] / "curves.png"
    try:
        plot(files, out, args.title or default_title(args.run_dirs, files))
    except (OSError, RuntimeError) as e:  # RuntimeError: a type whose writer needs a program missing here (.pgf: LaTeX)
        print(f"titan-rl plot: cannot write {out}: {e.strerror if isinstance(e, OSError) and e.strerror else e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
