"""The `titan-rl` console script as pip installs it: its commands, from any directory, and a
misconfigured env or policy stopped before any process starts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from titan_rl.metrics import eta_s, format_duration

TITAN_RL = Path(sys.executable).parent / "titan-rl"


def titan_rl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TITAN_RL), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_console_script_lists_its_commands_and_refuses_others(tmp_path):
    listed = titan_rl("--help", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for command in ("run", "buffer", "rollout", "trainer", "learner", "visualize", "plot"):
        assert f"  {command} " in listed.stdout
    unknown = titan_rl("trian", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr


@pytest.mark.parametrize("command", ["run", "buffer", "rollout", "trainer", "learner", "visualize", "plot"])
def test_every_command_answers_help_from_another_directory(tmp_path, command):
    result = titan_rl(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


@pytest.mark.parametrize(
    ("module", "usage"),
    [
        ("titan_rl.buffer", "usage: python -m titan_rl.buffer"),
        ("titan_rl.rollout", "usage: python -m titan_rl.rollout"),
        ("titan_rl.trainer", "usage: python -m titan_rl.trainer"),
        ("titan_rl.visualize", "usage: titan-rl visualize"),
        ("titan_rl.trainer.learner", "usage: python -m titan_rl.trainer.learner"),
    ],
)
def test_help_and_a_mistyped_option_answer_without_importing_torch(module, usage):
    """`--help` answered after 3-4 s of importing torch; the options come first now."""
    probe = (
        "import runpy, sys\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, [m for m in ('torch', 'gymnasium') if m in sys.modules], file=sys.stderr)\n"
    )
    for options, code in ((["--help"], 0), (["--rank=1", "--prot=1"] if module.endswith("learner") else ["--prot=1"], 2)):
        result = subprocess.run([sys.executable, "-c", probe, *options], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.stderr.strip().endswith(f"exit {code} []"), result.stderr
    assert result.stderr.startswith(usage) and "unrecognized arguments: --prot=1" in result.stderr


def test_the_shipped_configs_are_found_from_another_directory(tmp_path, monkeypatch):
    """`--config config/acrobot.yaml` names the project's file wherever the command runs."""
    from titan_rl.config import load_config, resolve_config_path

    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("config/acrobot.yaml") == REPO / "config" / "acrobot.yaml"
    assert load_config("config/acrobot.yaml").rollout_server.env_name == "Acrobot-v1"
    mine = tmp_path / "config" / "acrobot.yaml"  # a file of the user's own, where they stand, wins
    mine.parent.mkdir()
    mine.write_text((REPO / "config" / "acrobot.yaml").read_text())
    assert resolve_config_path("config/acrobot.yaml") == Path("config/acrobot.yaml")


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("rollout_server.env_name=NoSuchEnv-v0", "rollout_server.env_name='NoSuchEnv-v0'"),
        ("policy.kwargs.state_dim=5", "policy.path='models.simple_policy.SimplePolicy' does not fit"),
        ("policy.path=models.no_such_module.Policy", "policy.path='models.no_such_module.Policy': cannot import"),
    ],
)
def test_a_bad_env_or_policy_stops_the_launch_before_any_process_or_folder(tmp_path, override, named):
    started = time.monotonic()
    result = titan_rl("run", "--config", "config/cartpole.yaml", override, "logging.run_dir=runs", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "config/cartpole.yaml" in result.stderr and named in result.stderr, result.stderr
    assert "services up" not in result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists(), "no run folder is left behind"
    assert time.monotonic() - started < 60


def test_eta_is_the_time_left_at_the_rate_so_far():
    assert eta_s(0, 100_000, 10.0) is None
    assert eta_s(25_000, 100_000, 10.0) == pytest.approx(30.0)
    assert eta_s(30_000, 100_000, 10.0, start_env_steps=20_000) == pytest.approx(70.0)  # a resumed run: its own rate
    assert eta_s(120_000, 100_000, 10.0) == 0.0
    assert [format_duration(s) for s in (None, 59.6, 61, 3725)] == ["-:--", "1:00", "1:01", "1:02:05"]


def test_visualize_py_names_itself_in_its_usage():
    """`python visualize.py --help` showed the usage of `titan-rl visualize`, a command that may not be installed."""
    result = subprocess.run([sys.executable, "visualize.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: python visualize.py "), result.stdout


def test_run_sh_test_with_pytest_arguments_runs_those_tests_without_linting_the_tree(tmp_path):
    """A plugin's author running `bash run.sh test tests/test_algorithms.py` was stopped by ruff
    whenever any file of the tree was not formatted yet, before a single test ran."""
    import shutil

    copy = tmp_path / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    generated = [str(p.relative_to(REPO)) for p in (REPO / "titan_rl" / "v1").glob("*.py")]
    for name in [*tracked, *generated]:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)  # with its time: run.sh neither reinstalls nor regenerates
    (copy / ".venv").symlink_to(REPO / ".venv")
    (copy / "trainers" / "draft.py").write_text("import os,sys\nx=1\n")  # unformatted, unused imports
    command = ["bash", "run.sh", "test", "tests/test_nstep.py", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
