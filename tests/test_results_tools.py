"""The tools behind docs/results.md: the multi-seed runner trains and scores real runs, and the
curve plotter averages seeds that were evaluated at different steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import plot_curves, seeds


def write_metrics(path, points):
    path.parent.mkdir(parents=True)
    rows = [{"env_steps": s, "eval/mean_return": r, "charts/wall_s": s / 100} for s, r in points]
    rows.insert(1, {"env_steps": 1500, "losses/td_loss": 0.5})  # rows without an evaluation are skipped
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_curves_hold_each_seed_between_its_evaluations_and_average_where_all_have_one(tmp_path):
    write_metrics(tmp_path / "seed0" / "metrics.jsonl", [(1000, 0.0), (2000, 10.0), (3000, 20.0)])
    write_metrics(tmp_path / "seed1" / "metrics.jsonl", [(1000, 10.0), (2500, 30.0), (4000, 40.0)])
    curves = [plot_curves.eval_curve(f, "env_steps") for f in plot_curves.metrics_files(tmp_path)]
    grid, mean, std = plot_curves.band(curves)
    assert grid[0] == 1000 and grid[-1] == 3000  # where both seeds have evaluations
    at = {x: (m, s) for x, m, s in zip(grid, mean, std, strict=True)}
    assert at[1000] == (5.0, 5.0) and at[3000] == (25.0, 5.0)
    assert mean[np.searchsorted(grid, 2200)] == pytest.approx(10.0)  # seed0 holds 10, seed1 still 10
    plot_curves.plot(tmp_path, tmp_path / "curves.png", "test")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_runner_trains_each_seed_scores_both_checkpoints_and_skips_seeds_already_scored(tmp_path, capsys):
    out = tmp_path / "cartpole"
    overrides = ["budget.max_env_steps=3000", "eval.interval_env_steps=1000", "budget.target_eval_return=null"]
    assert seeds.main(["--config", "config/cartpole.yaml", "--seeds", "1", "--episodes", "3", "--out", str(out), *overrides]) == 0
    score = json.loads((out / "seed0" / "score.json").read_text())
    assert len(score["best_returns"]) == len(score["last_returns"]) == 3
    assert score["env_steps"] >= 3000 and score["wall_s"] > 0
    assert (out / "seed0" / "metrics.jsonl").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0] and summary["best_per_seed"] == [score["best_mean"]]
    capsys.readouterr()
    seeds.main(["--config", "config/cartpole.yaml", "--seeds", "1", "--out", str(out), *overrides])
    assert "seed 0: best" in capsys.readouterr().out
    assert json.loads((out / "seed0" / "score.json").read_text()) == score  # not run again


def test_the_runner_refuses_a_bad_key_before_any_run(tmp_path):
    from titan_rl.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        seeds.main(["--config", "config/cartpole.yaml", "--out", str(tmp_path), "train.bacth_size=3"])
    assert not list(tmp_path.iterdir())


def test_the_one_process_twin_trains_evaluates_and_scores_its_final_policy(tmp_path):
    from benchmarks import inproc_twin

    out = tmp_path / "twin.jsonl"
    inproc_twin.main(["--budget", "3000", "--out", str(out), "eval.interval_env_steps=1000", "eval.episodes=3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    evals, final = rows[:-1], rows[-1]
    assert evals and all(r["env_steps"] >= 1000 and np.isfinite(r["mean_return"]) for r in evals)
    assert len(final["final_returns"]) == 3 and final["wall_s"] > 0
