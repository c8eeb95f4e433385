"""Watch a trained policy play: greedy episodes from a TITAN-RL checkpoint, in a window or on video.

The checkpoint alone rebuilds everything: the env name, the policy class and its weights.

Usage (`titan-rl visualize` or `python visualize.py`, the same options):
    titan-rl visualize --model_path checkpoint.pth                    # a window (a video if there is no display)
    titan-rl visualize --model_path checkpoint.pth --output run.mp4   # record to .mp4 or .gif
    titan-rl visualize --model_path checkpoint.pth --no-render --episodes 20 --seed 100

Each episode prints `episode I: return=R length=L`; the last line of stdout is
`mean_return=M std_return=S episodes=N` (S: the population std over the N episodes).
Episode I (counted from 0) is reset with seed S+I, S from --seed, so a run repeats exactly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from titan_rl.errors import ModuleNotAllowedError, TitanError

if TYPE_CHECKING:  # torch, Gymnasium and imageio load where they are used: `--help` answers at once
    import gymnasium as gym
    from torch import nn

    from titan_rl.algorithm import Algorithm

VIDEO_FORMATS = (".mp4", ".gif")
DEFAULT_FPS = 30
"""Frame rate of a video when the env's metadata names none."""

FrameSink = Callable[[np.ndarray], None]


class VideoWriter(Protocol):
    def append_data(self, im: np.ndarray) -> None: ...

    def close(self) -> None: ...


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _video_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in VIDEO_FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r}: unsupported video format (use {' or '.join(VIDEO_FORMATS)})")
    return path


def parse_args(argv: Sequence[str] | None = None, prog: str = "titan-rl visualize") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="Play greedy episodes of a TITAN-RL checkpoint: in a window, on video, or only scored."
    )
    parser.add_argument("--model_path", "--model-path", type=Path, default=Path("checkpoint.pth"), help="checkpoint (default: %(default)s)")
    parser.add_argument("--episodes", type=_positive_int, default=5, help="episodes to play (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="episode I is reset with seed SEED+I (default: %(default)s)")
    parser.add_argument(
        "--allow-module",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="also build classes the checkpoint names under this package (default: only models/ and trainers/); repeatable",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-render", action="store_true", help="only play and score the episodes: no window, no video")
    mode.add_argument(
        "--output",
        type=_video_path,
        help=(
            "record to this .mp4 or .gif instead of opening a window (a GIF is kept in memory until written: prefer .mp4 for long runs);"
            " with no display and no --output: <checkpoint stem>.mp4 in the current folder"
        ),
    )
    return parser.parse_args(argv)


def display_available() -> bool:
    """Whether a window can open: on Linux and the BSDs that needs an X11 or a Wayland display."""
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def choose_mode(args: argparse.Namespace) -> tuple[str | None, Path | None]:
    """(Gymnasium render_mode, video path or None).

    Without a display, render_mode="human" would draw off-screen without a word, so a video is recorded instead.
    """
    if args.no_render:
        return None, None
    if args.output is not None:
        video = args.output
    elif display_available():
        return "human", None
    else:
        video = Path(f"{args.model_path.stem}.mp4")
        print(f"no display found (DISPLAY and WAYLAND_DISPLAY unset): recording to {video} instead of opening a window", file=sys.stderr)
    if not display_available():
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame renders to memory; keep it from probing for a screen
    return "rgb_array", video


def load_policy(path: Path, extra_modules: Sequence[str] = ()) -> tuple[nn.Module, Algorithm, str]:
    """The policy stored in a checkpoint, its algorithm and the name of the env it was trained on."""
    from titan_rl.checkpoint import load_checkpoint, policy_from_checkpoint

    try:
        policy, cfg, algorithm = policy_from_checkpoint(load_checkpoint(path), tuple(extra_modules))
    except ModuleNotAllowedError as e:  # importing a module runs its code: the user decides
        raise TitanError(f"{e}; to run code from package {e.package!r} for this checkpoint, add --allow-module {e.package}") from e
    return policy, algorithm, cfg.rollout_server.env_name


def make_env(env_name: str, render_mode: str | None) -> gym.Env:
    import gymnasium as gym

    try:
        return gym.make(env_name, render_mode=render_mode)
    except gym.error.Error as e:
        raise TitanError(f"env {env_name!r} (from the checkpoint): {e}") from e


def open_video(path: Path, fps: float) -> VideoWriter:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        # bits=8 stores each frame as a 256-colour palette image (a third of RGB) until the GIF is written on close
        return imageio.get_writer(path, duration=1000 / fps, loop=0, bits=8)
    # macro_block_size=2: H.264 needs even sizes, and CartPole's 600x400 is no multiple of the default 16;
    # preset veryfast: 500 CartPole frames encode in 1.35 s rather than 1.78 s, the file 5% smaller
    return imageio.get_writer(path, format="FFMPEG", fps=fps, macro_block_size=2, output_params=["-preset", "veryfast"])


Greedy = Callable[[np.ndarray], int]
"""One observation -> the algorithm's deterministic action."""


def greedy_policy(policy: nn.Module, algorithm: Algorithm) -> Greedy:
    return lambda obs: int(algorithm.greedy_actions(policy, np.asarray(obs)[None])[0])


def play_episode(env: gym.Env, policy: Greedy, seed: int, on_frame: FrameSink | None) -> tuple[float, int]:
    """(return, length) of one greedy episode; `on_frame` gets every frame, the reset one included."""
    obs, _ = env.reset(seed=seed)
    if on_frame is not None:
        on_frame(env.render())
    total, length, done = 0.0, 0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += float(reward)
        length += 1
        done = terminated or truncated
        if on_frame is not None:
            on_frame(env.render())
    return total, length


def play(env: gym.Env, policy: Greedy, episodes: int, seed: int, on_frame: FrameSink | None) -> list[float]:
    """Play and print each episode; return their returns."""
    returns = []
    for i in range(episodes):
        ret, length = play_episode(env, policy, seed + i, on_frame)
        print(f"episode {i}: return={ret} length={length}", flush=True)
        returns.append(ret)
    return returns


def record_episode(network: nn.Module, algorithm: Algorithm, env_name: str, seed: int, path: Path) -> tuple[float, int]:
    """(return, length) of one greedy episode, recorded to the video file `path` (.mp4 or .gif)."""
    if not display_available():
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    env = make_env(env_name, "rgb_array")
    try:
        with closing(open_video(path, env.metadata.get("render_fps") or DEFAULT_FPS)) as writer:
            return play_episode(env, greedy_policy(network, algorithm), seed, writer.append_data)
    finally:
        env.close()


def run(args: argparse.Namespace) -> list[float]:
    network, algorithm, env_name = load_policy(args.model_path, args.allow_module)
    policy = greedy_policy(network, algorithm)
    render_mode, video = choose_mode(args)
    env = make_env(env_name, render_mode)
    try:
        if video is None:
            return play(env, policy, args.episodes, args.seed, None)
        fps = env.metadata.get("render_fps") or DEFAULT_FPS
        with closing(open_video(video, fps)) as writer:
            returns = play(env, policy, args.episodes, args.seed, writer.append_data)
        print(f"video saved to {video}", file=sys.stderr)
        return returns
    finally:
        env.close()


def main(argv: Sequence[str] | None = None, prog: str = "titan-rl visualize") -> int:
    """`prog`: the command its --help and errors name (visualize.py passes its own)."""
    args = parse_args(argv, prog)
    try:
        returns = run(args)
    except TitanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"mean_return={np.mean(returns)} std_return={np.std(returns)} episodes={len(returns)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
