"""Scoring a policy: one deterministic episode in each of several envs run side by side."""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing as mp
import queue
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from titan_rl.algorithm import Algorithm, cpu_state
from titan_rl.checkpoint import load_checkpoint
from titan_rl.config import Config, config_from_dict, config_to_dict
from titan_rl.envs import make_vector_env
from titan_rl.errors import TitanError

log = logging.getLogger(__name__)

ActFn = Callable[[np.ndarray], np.ndarray]


def evaluate(act: ActFn, env_name: str, episodes: int, seed: int) -> list[float]:
    """Return of one episode in each of `episodes` envs, acting with `act(obs) -> actions`."""
    env = make_vector_env(env_name, episodes)
    try:
        obs, _ = env.reset(seed=seed)
        returns = np.zeros(episodes)
        running = np.ones(episodes, dtype=bool)
        while running.any():
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            returns += np.where(running, reward, 0.0)
            running &= ~(terminated | truncated)
        return returns.tolist()
    finally:
        env.close()


def eval_seed(run_seed: int, evals: int, episodes: int) -> int:
    """The first reset seed of a run's `evals`-th evaluation: fresh episodes every time, the confirming
    set (from this seed + `episodes`) included, and apart from other runs' and the scoring seeds."""
    return 1_000_003 * (run_seed + 1) + 2 * evals * episodes


def confirmation_bar(best: float | None, target: float | None) -> float:
    """The first-set score from which an evaluation is played again on new episodes: one that would
    become the kept checkpoint (beat `best`) or end the run (reach `target`). The best of ~20 noisy
    20-episode means overstates its policy (on Acrobot the kept checkpoint scored below the last
    policy in 3 of 5 seeds); a 40-episode mean to enter halves the variance of the score that decides."""
    if best is None:
        return float("-inf")
    return best if target is None else min(best, target)


def evaluate_confirmed(act: ActFn, env_name: str, episodes: int, seed: int, confirm_seed: int, confirm_from: float) -> list[float]:
    """`evaluate` on `episodes` episodes, then on as many from `confirm_seed` if their mean reaches `confirm_from`."""
    returns = evaluate(act, env_name, episodes, seed)
    if np.mean(returns) >= confirm_from:
        returns += evaluate(act, env_name, episodes, confirm_seed)
    return returns


@dataclass
class EvalJob:
    """A frozen copy of the learner's state to score: the returns are the ones of `state['policy']`."""

    env_steps: int
    state: dict[str, Any]
    seed: int
    confirm_seed: int  # the first reset seed of a second set of episodes...
    confirm_from: float  # ...played when the first set's mean reaches this (inf: never)


@dataclass(frozen=True)
class VideoJob:
    """One greedy episode of the policy in the checkpoint at `checkpoint_path`, recorded to `video_path`."""

    checkpoint_path: str
    video_path: str
    seed: int


@dataclass
class EvalResult:
    job: EvalJob
    returns: list[float]


class Evaluator:
    """Scores snapshots of the learner in a process of its own, so evaluation never stalls updates.

    A thread in the trainer process was tried first: sharing the GIL with the learner, one
    evaluation of 20 CartPole episodes took over 8 s instead of about 0.3 s, and slowed the
    learner while it ran. The child rebuilds the algorithm and network from the config and
    loads each snapshot's policy weights from `torch.save` bytes (`weights_only=True`).

    How the process starts (`start()`, or the first `submit`) is `start_method`'s: "fork" where the
    caller has imported torch and calls `start()` before it has any thread, gRPC or parallel
    torch work to copy half-way (the trainer, first thing), so the evaluator needs no imports of
    its own; "spawn" (the default) anywhere else, at the cost of importing torch again (2-3
    CPU-seconds, which compete with training on a small machine).

    `submit` hands over a job if the evaluator is idle (a job arriving while one runs is
    dropped: the next interval brings a fresher one); `results()` returns finished ones. One
    lucky set of episodes must neither end training nor become the kept checkpoint: a score that
    reaches the job's `confirm_from` (`confirmation_bar`: the lower of the best score so far and
    the target) is confirmed on as many new episodes, and the result holds both sets. `record` plays
    one greedy episode of a checkpoint to a video file: the trainer's end-of-run video.
    """

    def __init__(self, cfg: Config, episodes: int, start_method: str = "spawn"):
        ctx = mp.get_context(start_method)
        self._jobs = ctx.Queue(maxsize=1)
        self._results = ctx.Queue()
        self._running: EvalJob | None = None
        self._process = ctx.Process(
            target=_evaluator_main,
            args=(config_to_dict(cfg), episodes, self._jobs, self._results),
            name="evaluator",
            daemon=True,
        )

    def start(self) -> None:
        """Start the evaluator process, if not yet started."""
        if self._process.pid is None:
            self._process.start()

    @property
    def idle(self) -> bool:
        return self._running is None

    def submit(self, job: EvalJob) -> bool:
        """Queue `job` if no evaluation is running; False if one is."""
        if self._running is not None:
            return False
        self.start()
        if not self._process.is_alive():
            raise TitanError(f"the evaluator process exited with code {self._process.exitcode}")
        buffer = io.BytesIO()
        torch.save(job.state["policy"], buffer)
        self._running = job
        self._jobs.put((job.seed, job.confirm_seed, job.confirm_from, buffer.getvalue()))
        return True

    def results(self, wait_s: float = 0.0) -> list[EvalResult]:
        """The finished evaluation, if any; with `wait_s`, first wait that long for a running one."""
        if self._running is None:
            return []
        reply = self._reply(wait_s)
        if reply is None:
            return []
        job, self._running = self._running, None
        if isinstance(reply, str):
            raise TitanError(f"evaluation failed: {reply}")
        return [EvalResult(job, reply)]

    def record(self, job: VideoJob, timeout_s: float) -> tuple[float, int]:
        """Play and record `job`'s episode; (return, length). The process already holds torch and the
        network, which a fresh `titan-rl visualize` would import and build again (~2 CPU-seconds),
        and it was started before the caller had any gRPC channel, so the encoder it forks copies none."""
        if self._running is not None:
            raise TitanError("the evaluator is still scoring a policy")
        self.start()
        self._jobs.put(job)
        reply = self._reply(timeout_s)
        if reply is None:
            raise TitanError(f"the evaluator is still recording after {timeout_s:.0f}s")
        if isinstance(reply, str):
            raise TitanError(reply)
        return reply

    def _reply(self, wait_s: float) -> Any:
        """The process's next reply, waiting up to `wait_s` (0: not at all); None if none came yet."""
        try:
            return self._results.get(timeout=wait_s) if wait_s else self._results.get_nowait()
        except queue.Empty:
            if not self._process.is_alive():
                raise TitanError(f"the evaluator process exited with code {self._process.exitcode}") from None
            return None

    def close(self) -> None:
        if self._process.pid is None:
            return
        with contextlib.suppress(ValueError, OSError, queue.Full):  # full: a job still unread; terminate() below
            self._jobs.put(None, timeout=1.0)
        self._process.join(5.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(1.0)


def _evaluator_main(raw_config: dict[str, Any], episodes: int, jobs: Any, results: Any) -> None:
    """The evaluator process: rebuild the network from the config, then score every job it is sent."""
    from titan_rl.registry import build_algorithm, build_policy
    from titan_rl.service import exit_with_parent_process, leave_stop_signals_to_parent

    leave_stop_signals_to_parent()  # the trainer stops it through `jobs`
    exit_with_parent_process()  # a trainer that dies without a word
    torch.set_num_threads(1)
    cfg = config_from_dict(raw_config, "evaluator config")
    algorithm, network = build_algorithm(cfg), build_policy(cfg).eval()
    env_name = cfg.rollout_server.env_name

    def act(obs: np.ndarray) -> np.ndarray:
        return algorithm.greedy_actions(network, obs)

    while True:
        job = jobs.get()
        if job is None:
            return
        if isinstance(job, VideoJob):
            results.put(_record(job, network, algorithm, env_name))
            continue
        seed, confirm_seed, bar, weights = job
        try:
            network.load_state_dict(torch.load(io.BytesIO(weights), weights_only=True))
            results.put(evaluate_confirmed(act, env_name, episodes, seed, confirm_seed, bar))
        except Exception as e:  # reported to the trainer by results()
            results.put(f"{type(e).__name__}: {e}")


def _record(job: VideoJob, network: torch.nn.Module, algorithm: Algorithm, env_name: str) -> tuple[float, int] | str:
    """`job`'s episode, or why it could not be recorded."""
    from titan_rl.visualize import record_episode  # imageio and the renderer: only once a run has ended

    try:
        network.load_state_dict(load_checkpoint(job.checkpoint_path)["policy"])
        return record_episode(network, algorithm, env_name, job.seed, Path(job.video_path))
    except Exception as e:  # the run has ended well whatever happens here: the trainer logs it
        return f"{type(e).__name__}: {e}"


def snapshot(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a learner state on the CPU, so later updates do not change it."""
    return cpu_state(dict(state), copy=True)
