"""visualize.py as a user runs it: a subprocess on a real (untrained) checkpoint. Errors found before
any episode runs (bad arguments, a file that is no checkpoint) are checked in this process, through
the same `main`: a subprocess would only add 3-4 s of imports each."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import pytest

from tests.helpers import DEFAULT_CONFIG, REPO

EPISODE_LINE = re.compile(r"^episode (\d+): return=(\S+) length=(\d+)$")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A checkpoint of a freshly initialised policy, written the way the trainer service writes one."""
    from titan_rl.checkpoint import save_checkpoint
    from titan_rl.config import load_config
    from titan_rl.registry import build_algorithm, build_policy

    cfg = load_config(DEFAULT_CONFIG)
    learner = build_algorithm(cfg).make_learner(build_policy(cfg))
    counters = {"updates": 0, "env_steps": 0, "policy_version": 0, "wall_s": 0.0}
    return save_checkpoint(tmp_path / "ck.pth", cfg, learner.state_dict(), counters, None)


def visualize(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run visualize.py with no display, so that no test ever opens a window."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):
        env.pop(name, None)
    cmd = [sys.executable, str(REPO / "visualize.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def visualize_here(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """`main` in this process: its exit code (argparse's too) and what it wrote to stderr."""
    from titan_rl.visualize import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse refuses bad arguments this way
        code = e.code
    return code, capsys.readouterr().err


def episode_returns(stdout: str) -> list[float]:
    return [float(m.group(2)) for line in stdout.splitlines() if (m := EPISODE_LINE.match(line))]


def test_no_render_prints_each_episode_and_the_mean_last(checkpoint: Path):
    result = visualize("--model_path", checkpoint, "--no-render", "--episodes", "3")
    assert result.returncode == 0, result.stderr
    returns = episode_returns(result.stdout)
    assert len(returns) == 3
    last = dict(pair.split("=") for pair in result.stdout.splitlines()[-1].split())
    assert list(last) == ["mean_return", "std_return", "episodes"]
    assert float(last["mean_return"]) == pytest.approx(np.mean(returns))
    assert float(last["std_return"]) == pytest.approx(np.std(returns))
    assert last["episodes"] == "3"


def test_same_seed_same_episodes(checkpoint: Path):
    first = visualize("--model_path", checkpoint, "--no-render", "--episodes", "2", "--seed", "7")
    second = visualize("--model_path", checkpoint, "--no-render", "--episodes", "2", "--seed", "7")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_gif_output(checkpoint: Path, tmp_path: Path):
    gif = tmp_path / "x.gif"
    result = visualize("--model_path", checkpoint, "--output", gif, "--episodes", "1")
    assert result.returncode == 0, result.stderr
    assert gif.stat().st_size > 0
    frames = iio.imread(gif, index=None)
    assert frames.ndim == 4 and len(frames) >= 2
    assert frames.shape[1:] == (400, 600, 3)


def test_mp4_output(checkpoint: Path, tmp_path: Path):
    mp4 = tmp_path / "x.mp4"
    result = visualize("--model_path", checkpoint, "--output", mp4, "--episodes", "1")
    assert result.returncode == 0, result.stderr
    assert mp4.stat().st_size > 0
    with imageio.get_reader(mp4, format="FFMPEG") as reader:
        frame = reader.get_data(0)
    assert frame.shape == (400, 600, 3)


def test_without_a_display_it_records_instead_of_opening_a_window(checkpoint: Path, tmp_path: Path):
    result = visualize("--model_path", checkpoint, "--episodes", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    video = tmp_path / "ck.mp4"
    assert video.stat().st_size > 0
    assert "no display" in result.stderr and "ck.mp4" in result.stderr
    assert result.stdout.splitlines()[-1].startswith("mean_return=")


def _truncated_torch_file(path: Path) -> None:
    """A torch file cut short past its first 4 KiB: torch's reader fails with OSError EINVAL there."""
    import torch

    torch.save({"a": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:5000])


@pytest.mark.parametrize(
    "name, make",
    [
        ("missing.pth", lambda path: None),
        ("notes.txt", lambda path: path.write_text("not a checkpoint\n")),
        ("hello.txt", lambda path: path.write_text("hello\n")),  # torch's legacy reader raised KeyError
        ("folder.pth", lambda path: path.mkdir()),
        ("truncated.pth", _truncated_torch_file),
    ],
)
def test_bad_checkpoint_is_a_one_line_error(tmp_path: Path, capsys, name: str, make):
    path = tmp_path / name
    make(path)
    code, stderr = visualize_here(capsys, "--model_path", path, "--no-render")
    assert code == 1
    assert stderr.startswith("error: ") and str(path) in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--output", "x.avi"], "unsupported video format"),
        (["--episodes", "0"], "must be at least 1"),
        (["--no-render", "--output", "x.mp4"], "not allowed with"),
    ],
)
def test_bad_arguments(checkpoint: Path, capsys, args: list[str], message: str):
    code, stderr = visualize_here(capsys, "--model_path", checkpoint, *args)
    assert code == 2 and message in stderr, stderr


@pytest.mark.parametrize(
    ("key", "path", "kwargs"),
    [
        ("policy", "subprocess.Popen", {"args": ["touch", "{marker}"]}),
        ("policy", "os.system", {"command": "touch {marker}"}),
        ("algorithm", "subprocess.Popen", {}),
        ("policy", "trainers.dqn.DQN", {}),  # inside the allowed packages, but not a network
    ],
)
def test_a_crafted_checkpoint_naming_any_other_callable_is_refused_and_runs_nothing(tmp_path: Path, key, path, kwargs):
    import torch

    from titan_rl.checkpoint import FORMAT
    from titan_rl.config import config_to_dict, load_config

    marker = tmp_path / "ran"
    raw = config_to_dict(load_config(DEFAULT_CONFIG))
    filled = {k: ([a.format(marker=marker) for a in v] if isinstance(v, list) else str(v).format(marker=marker)) for k, v in kwargs.items()}
    raw[key] = {**raw[key], "path": path, **({"kwargs": filled} if key == "policy" else {})}
    crafted = tmp_path / "crafted.pth"
    torch.save({"format": FORMAT, "config": raw, "policy": {}, "learner": {}, "counters": {}, "eval_returns": []}, crafted)
    result = visualize("--model_path", crafted, "--no-render", "--episodes", "1")
    assert result.returncode == 1 and "error:" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert any(why in result.stderr for why in ("not allowed here", "is not a subclass of torch.nn", "not a dotted path of Python names"))
    assert not marker.exists()


def test_a_crafted_checkpoint_whose_env_id_names_a_module_imports_it_only_when_allowed(tmp_path: Path):
    """Gymnasium imports `module` of an env id `module:EnvId`: from a checkpoint that ran the module's code unsaid."""
    import torch

    from titan_rl.checkpoint import FORMAT, policy_from_checkpoint
    from titan_rl.config import config_to_dict, load_config
    from titan_rl.errors import TitanError

    marker = tmp_path / "ran"
    (tmp_path / "planted_env.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    raw = config_to_dict(load_config(DEFAULT_CONFIG))
    raw["rollout_server"]["env_name"] = "planted_env:CartPole-v1"
    weights = torch.load(_fresh_checkpoint(tmp_path), weights_only=True)["policy"]
    payload = {"format": FORMAT, "config": raw, "policy": weights, "learner": {}, "counters": {}, "eval_returns": []}
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(TitanError, match="rollout_server.env_name='planted_env:CartPole-v1' imports module 'planted_env'"):
            policy_from_checkpoint(payload)
        assert not marker.exists() and "planted_env" not in sys.modules
        policy_from_checkpoint(payload, extra_modules=("planted_env",))  # what --allow-module planted_env does
        assert marker.exists()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("planted_env", None)
    raw["rollout_server"]["env_name"] = "titan_rl.minatar_envs:MinAtar/Breakout-v1"
    raw["logging"]["run_name"] = "titan_rl.minatar_envs:MinAtar/Breakout-v1-seed0-20261203-120000"  # an older default: a path
    assert policy_from_checkpoint(payload)[1].rollout_server.env_name == raw["rollout_server"]["env_name"], "the shipped module is allowed"


def _fresh_checkpoint(tmp_path: Path) -> Path:
    from titan_rl.checkpoint import save_checkpoint
    from titan_rl.config import load_config
    from titan_rl.registry import build_algorithm, build_policy

    cfg = load_config(DEFAULT_CONFIG)
    learner = build_algorithm(cfg).make_learner(build_policy(cfg))
    counters = {"updates": 0, "env_steps": 0, "policy_version": 0, "wall_s": 0.0}
    return save_checkpoint(tmp_path / "fresh.pth", cfg, learner.state_dict(), counters, None)


def test_a_checkpoint_never_holds_the_runs_token(tmp_path: Path):
    import torch

    from titan_rl.checkpoint import save_checkpoint
    from titan_rl.config import load_config
    from titan_rl.registry import build_algorithm, build_policy

    cfg = load_config(DEFAULT_CONFIG, ["security.token=s3cret-run-token"])
    learner = build_algorithm(cfg).make_learner(build_policy(cfg))
    path = save_checkpoint(tmp_path / "ck.pth", cfg, learner.state_dict(), {"updates": 0}, None)
    assert b"s3cret-run-token" not in path.read_bytes()
    assert torch.load(path, weights_only=True)["config"]["security"]["token"] == "<redacted>"


def test_a_policy_class_of_the_users_own_package_loads_only_when_named_on_the_command_line(tmp_path: Path):
    from titan_rl.checkpoint import save_checkpoint
    from titan_rl.config import load_config
    from titan_rl.registry import build_algorithm, build_policy

    (tmp_path / "mynets").mkdir()
    (tmp_path / "mynets" / "__init__.py").write_text("")
    source = "from models.simple_policy import SimplePolicy\n\n\nclass Net(SimplePolicy):\n    pass\n"
    (tmp_path / "mynets" / "policy.py").write_text(source)
    cfg = load_config(DEFAULT_CONFIG)
    learner = build_algorithm(cfg).make_learner(build_policy(cfg))
    cfg = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, path="mynets.policy.Net"))
    counters = {"updates": 0, "env_steps": 0, "policy_version": 0, "wall_s": 0.0}
    path = save_checkpoint(tmp_path / "mine.pth", cfg, learner.state_dict(), counters, None)

    refused = visualize("--model_path", path, "--no-render", "--episodes", "1", cwd=tmp_path)
    assert refused.returncode == 1 and "not allowed here" in refused.stderr, refused.stderr
    assert "add --allow-module mynets" in refused.stderr, "the way to allow it is named"
    played = visualize("--model_path", path, "--no-render", "--episodes", "1", "--allow-module", "mynets", cwd=tmp_path)
    assert played.returncode == 0 and len(episode_returns(played.stdout)) == 1, played.stderr
