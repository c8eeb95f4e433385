"""Time to solve CartPole-v1 at two commits, side by side: did a change make the default DQN slower?

Checks out `--baseline` (a commit) into a temporary git worktree, generates its protobuf code, and
runs `benchmarks.solve_time --only titan` there and in this tree, one seed at a time, alternating
which tree goes first, so drift on the machine hits both alike. Prints every run and the medians.

    .venv/bin/python -m benchmarks.solve_time_ab --baseline ffa7830 --seeds 0 1 2 3 4 5 6 7 8 9
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^titan seed (\d+): solved at (\S+)s / (\S+) env steps, final eval (\S+)")


def run_seed(tree: Path, seed: int, budget: int) -> dict:
    """One `solve_time --only titan` run in `tree`; None fields when the seed never solved."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.solve_time", "--only", "titan", "--seeds", str(seed), "--budget", str(budget)],
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    match = next(m for line in out.splitlines() if (m := LINE.match(line)))
    solved_s, steps, final = match.group(2), match.group(3), float(match.group(4))
    return {"solved_s": None if solved_s == "-" else float(solved_s), "steps": None if steps == "-" else int(steps), "final": final}


def median(values: list[float | None]) -> float:
    """A run that never solved counts as infinitely slow."""
    return statistics.median([float("inf") if v is None else v for v in values])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="commit to compare this tree with")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--budget", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="solve_time_ab-") as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(baseline), args.baseline], cwd=REPO, check=True)
        try:
            env = {**os.environ, "PYTHON": sys.executable}
            subprocess.run(["bash", "generate_proto.sh"], cwd=baseline, check=True, capture_output=True, env=env)
            trees = {"baseline": baseline, "this": REPO}
            results: dict[str, list[dict]] = {name: [] for name in trees}
            for i, seed in enumerate(args.seeds):
                for name in ["baseline", "this"] if i % 2 == 0 else ["this", "baseline"]:
                    r = run_seed(trees[name], seed, args.budget)
                    results[name].append(r)
                    solved = "-" if r["solved_s"] is None else f"{r['solved_s']:.1f}"
                    steps = r["steps"] or "-"
                    print(f"{name:8s} seed {seed}: solved at {solved}s / {steps} env steps, final eval {r['final']:.1f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, check=False)
    print(f"\ntree      median solve s   median solve steps   final >= 475   ({len(args.seeds)} seeds, baseline {args.baseline})")
    for name, rs in results.items():
        print(
            f"{name:8s}  {median([r['solved_s'] for r in rs]):14.1f}   {median([r['steps'] for r in rs]):18.0f}"
            f"   {sum(r['final'] >= 475 for r in rs)}/{len(rs)}"
        )
    ratio = median([r["solved_s"] for r in results["this"]]) / median([r["solved_s"] for r in results["baseline"]])
    print(f"\nthis / baseline median time to solve: {ratio:.2f}")


if __name__ == "__main__":
    main()
