"""The tools behind docs/results.md: the multi-seed runner trains and scores real runs, and the
curve plotter (titan_rl/plot.py) draws one run or averages many evaluated at different steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from benchmarks import seeds
from titan_rl import plot


def write_metrics(path, points, key="eval/mean_return"):
    path.parent.mkdir(parents=True)
    rows = [{"env_steps": s, key: r, "charts/wall_s": s / 100} for s, r in points]
    rows.insert(1, {"env_steps": 1500, "losses/td_loss": 0.5})  # rows without a return are skipped
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def assert_png(path, capsys):
    assert capsys.readouterr().out.strip() == str(path)  # the path written is printed
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert iio.imread(path).shape[:2] == (400, 1100)  # 11 x 4 inches at 100 dpi


def test_one_run_folder_is_drawn_next_to_its_metrics_titled_by_its_config(tmp_path, capsys):
    run = tmp_path / "Acrobot-v1-seed0-20260101-000000"
    write_metrics(run / "metrics.jsonl", [(1000, -500.0), (2000, -200.0), (3000, -90.0)])
    (run / "config.yaml").write_text("rollout_server:\n  env_name: Acrobot-v1\n")
    assert plot.main([str(run)]) == 0
    assert_png(run / "curves.png", capsys)
    assert plot.default_title([run], plot.metrics_files([run])) == "Acrobot-v1"
    assert plot.default_title([tmp_path], []) == tmp_path.name  # no config.yaml: the folder's name


def test_a_folder_of_runs_is_averaged_where_all_have_an_evaluation(tmp_path, capsys):
    write_metrics(tmp_path / "seed0" / "metrics.jsonl", [(1000, 0.0), (2000, 10.0), (3000, 20.0)])
    write_metrics(tmp_path / "seed1" / "metrics.jsonl", [(1000, 10.0), (2500, 30.0), (4000, 40.0)])
    write_metrics(tmp_path / "seed2" / "metrics.jsonl", [(500, 20.0), (3000, 50.0)])
    files = plot.metrics_files([tmp_path])
    assert [f.parent.name for f in files] == ["seed0", "seed1", "seed2"]
    grid, mean, std = plot.band([plot.eval_curve(f, "env_steps") for f in files])
    assert grid[0] == 1000 and grid[-1] == 3000  # where every run has evaluations
    assert mean[0] == pytest.approx(10.0) and std[0] == pytest.approx(np.std([0, 10, 20]))
    assert mean[-1] == pytest.approx(np.mean([20, 30, 50])) and std[-1] == pytest.approx(np.std([20, 30, 50]))
    at_2200 = np.searchsorted(grid, 2200)  # seed0 holds 10, seed1 still 10, seed2 still 20
    assert mean[at_2200] == pytest.approx(40 / 3) and std[at_2200] == pytest.approx(np.std([10, 10, 20]))
    wall_grid, wall_mean, _ = plot.band([plot.eval_curve(f, "wall_s") for f in files])
    assert wall_grid[0] == 10 and wall_grid[-1] == 30 and wall_mean[0] == pytest.approx(10.0)
    out = tmp_path / "img" / "set.png"
    assert plot.main([str(tmp_path), "--out", str(out), "--title", "three seeds"]) == 0
    assert_png(out, capsys)


def test_several_run_dirs_are_drawn_together(tmp_path, capsys):
    write_metrics(tmp_path / "a" / "metrics.jsonl", [(1000, 1.0), (2000, 3.0)])
    write_metrics(tmp_path / "set" / "seed0" / "metrics.jsonl", [(1000, 5.0), (2000, 7.0)])
    write_metrics(tmp_path / "set" / "seed1" / "metrics.jsonl", [(1000, 9.0), (2000, 11.0)])
    dirs = [tmp_path / "a", tmp_path / "set", tmp_path / "a"]  # a folder named twice counts once
    assert len(plot.metrics_files(dirs)) == 3
    figure = plot.plot(plot.metrics_files(dirs), tmp_path / "both.png", "t")
    assert all(len(axis.lines) == 3 + 1 for axis in figure.axes)  # a grey line per run and their mean
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == ["greedy eval return: mean of 3 runs", "± 1 std"]
    assert plot.main([str(d) for d in dirs]) == 0
    assert_png(tmp_path / "a" / "curves.png", capsys)  # by default next to the first RUN_DIR
    assert plot.default_title(dirs[:2], []) == "a, set"


def test_folders_with_nothing_to_draw_exit_2_naming_them(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    run = tmp_path / "losses_only"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"env_steps": 100, "losses/td_loss": 0.5}) + "\n" + '{"env_steps": 2')
    assert plot.main([str(tmp_path / "empty"), str(run)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and str(run) in err
    assert not (tmp_path / "empty" / "curves.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "no such folder: {missing}"),  # said "no rows" as if the folder held runs
        (["{run}", "--out", "{tmp}/x.xyz"], "x.xyz: xyz file type; one of "),  # was matplotlib's traceback
        (["{run}", "--out", "{tmp}/x"], "x: no file type; one of "),
    ],
)
def test_a_missing_folder_or_an_image_type_matplotlib_cannot_write_is_refused_by_name(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    write_metrics(run / "metrics.jsonl", [(1000, 100.0)])
    names = {"missing": tmp_path / "nope", "run": run, "tmp": tmp_path}
    with pytest.raises(SystemExit) as e:
        plot.main([a.format(**names) for a in args])
    assert e.value.code == 2 and message.format(**names) in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))


def test_an_unwritable_image_path_is_an_error_not_a_traceback(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run / "metrics.jsonl", [(1000, 100.0)])
    assert plot.main([str(run), "--out", "/dev/null/x.png"]) == 1
    assert "cannot write /dev/null/x.png" in capsys.readouterr().err
    if not shutil.which("xelatex"):  # a type matplotlib lists, whose writer runs LaTeX
        assert plot.main([str(run), "--out", str(tmp_path / "x.pgf")]) == 1
        assert f"cannot write {tmp_path / 'x.pgf'}: " in capsys.readouterr().err


def test_a_run_without_evaluations_falls_back_to_the_training_return(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run / "metrics.jsonl", [(1000, 12.0), (2000, 30.0)], key="charts/episodic_return")
    assert plot.run_metric(run / "metrics.jsonl") == plot.TRAIN
    x, y = plot.eval_curve(run / "metrics.jsonl", "env_steps", plot.TRAIN)
    assert x.tolist() == [1000, 2000] and y.tolist() == [12.0, 30.0]
    figure = plot.plot([run / "metrics.jsonl"], tmp_path / "fallback.png", "t")
    assert figure.axes[0].get_ylabel() == plot.LABELS[plot.TRAIN] != plot.LABELS[plot.EVAL]
    assert [len(axis.lines) for axis in figure.axes] == [1, 1]  # one run: just its curve
    assert plot.main([str(run)]) == 0
    assert_png(run / "curves.png", capsys)
    write_metrics(tmp_path / "evaluated" / "metrics.jsonl", [(1000, 100.0), (2000, 150.0)])
    assert plot.run_metric(tmp_path / "evaluated" / "metrics.jsonl") == plot.EVAL
    figure = plot.plot(plot.metrics_files([tmp_path]), tmp_path / "mixed.png", "t")  # never averaged together
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == [plot.LABELS[plot.EVAL], plot.LABELS[plot.TRAIN]]
    assert figure.axes[0].get_ylabel() == "return (see legend)"


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


def test_the_summary_judges_the_last_policy_on_the_first_20_episodes_and_on_all_of_them():
    def score(seed: int, best: list[float], last: list[float]) -> dict:
        return {"seed": seed, "best_returns": best, "last_returns": last, "env_steps": 100, "wall_s": 1.0}

    # seed 0 is more than 10% short on its first 20 episodes (-90 against -80), not on all 40 (-83);
    # seed 1's last policy scores above its kept one: negative returns are judged by their distance below
    scores = [score(0, [-80.0] * 40, [-90.0] * 20 + [-76.0] * 20), score(1, [-100.0, -90.0] * 20, [-80.0] * 40)]
    summary = seeds.summarize("config/acrobot.yaml", scores)
    assert summary["episodes"] == 40 and summary["last_within_10pct"] == "2/2"
    assert summary["last_per_seed"] == [-83.0, -80.0] and summary["best_standard_error_per_seed"][0] == 0.0
    assert summary["best_standard_error_per_seed"][1] == pytest.approx(5.0 * (40 / 39) ** 0.5 / 40**0.5)
    first = summary["first_20_episodes"]
    assert first["episodes"] == 20 and first["last_per_seed"] == [-90.0, -80.0] and first["last_within_10pct"] == "1/2"
    assert seeds.last_is_within(-80.0, -88.0) and not seeds.last_is_within(-80.0, -88.1)
    assert seeds.last_is_within(200.0, 180.0) and not seeds.last_is_within(200.0, 179.9)
    assert "first_20_episodes" not in seeds.summarize("config/acrobot.yaml", [score(0, [1.0] * 20, [1.0] * 20)])


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
    (start,), evals, final = rows[:1], rows[1:-1], rows[-1]
    assert 1000 <= start["first_update"] < 1100 and start["time"] > 0  # once min_buffer_size (1000) records are stored
    assert evals and all(r["env_steps"] >= 1000 and np.isfinite(r["mean_return"]) for r in evals)
    assert evals[0]["episodes"] == 6 and {r["episodes"] for r in evals} <= {3, 6}, "a new best is confirmed, as the trainer does"
    assert len(final["final_returns"]) == 3 and final["wall_s"] > 0


def test_solve_time_keeps_the_runs_files_only_where_asked_and_only_in_an_empty_folder(tmp_path, monkeypatch):
    from benchmarks.solve_time import work_dir

    with work_dir(None) as temporary:
        (temporary / "metrics.jsonl").write_text("{}")
    assert not temporary.exists()
    kept = tmp_path / "kept" / "set"
    with work_dir(kept) as work:
        (work / "metrics.jsonl").write_text("{}")
    assert (kept / "metrics.jsonl").exists()
    with pytest.raises(SystemExit, match="not empty"), work_dir(kept):
        pass
    monkeypatch.chdir(tmp_path)
    with work_dir(Path("relative")) as work:
        assert work == tmp_path / "relative", "absolute: the runs start in the repository's root"
