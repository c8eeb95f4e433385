"""Which run a trainer continues, and from what.

A run is named by `logging.run_name`. A trainer whose `<stem>_last.pth` (written every
`durability.checkpoint_interval_s`) belongs to its run resumes from it: learner (weights,
optimizer, target network), counters (updates, env steps, policy version, wall-clock) and so the
exploration schedule, which runs on the env-step count. `checkpoint.pth` is replaced only by a
better evaluation of the same run: its score is where a resumed trainer's "best" starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from titan_rl.algorithm import Learner
from titan_rl.checkpoint import NotACheckpointError, last_path, load_checkpoint, run_name_of
from titan_rl.config import Config
from titan_rl.errors import TitanError

log = logging.getLogger(__name__)


def resume_point(cfg: Config) -> dict[str, Any] | None:
    """The last checkpoint of this run (same `logging.run_name`), or None: a new run."""
    path = last_path(cfg.logging.checkpoint_path)
    if not cfg.logging.run_name or not path.exists():
        return None
    try:
        payload = load_checkpoint(path)
    except NotACheckpointError as e:  # one that cannot be read now (an I/O error) stops the trainer: a restart may read it
        log.warning("not resuming from %s: %s", path, e)
        return None
    if run_name_of(payload) != cfg.logging.run_name:
        return None
    return payload


def best_of_run(cfg: Config) -> float | None:
    """The eval score of `checkpoint.pth` if this run wrote it, else None (another run's file is replaced)."""
    path = Path(cfg.logging.checkpoint_path)
    if not cfg.logging.run_name or not path.exists():
        return None
    try:
        payload = load_checkpoint(path)
    except NotACheckpointError:
        return None
    returns = payload.get("eval_returns") or []
    if run_name_of(payload) != cfg.logging.run_name or not returns:
        return None
    return float(np.mean(returns))


RESUMED_KEYS = (("rollout_server", "env_name"), ("algorithm", "path"), ("policy", "path"))
"""What a run is: the config keys `--resume` must find unchanged in the checkpoint it continues."""


def _load_learner(cfg: Config, learner: Learner, payload: dict[str, Any]) -> None:
    try:
        learner.load_state_dict(payload["learner"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        first_lines = " ".join(str(e).split())[:400]  # torch lists every mismatched tensor over many lines
        raise TitanError(f"cannot resume run {cfg.logging.run_name!r} from {last_path(cfg.logging.checkpoint_path)}: {first_lines}") from e


def _check_same_run(cfg: Config, payload: dict[str, Any]) -> None:
    """TitanError unless the checkpoint's run trained what `cfg` trains (`RESUMED_KEYS`)."""
    stored = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    for section, key in RESUMED_KEYS:
        then = stored.get(section, {}).get(key) if isinstance(stored.get(section), dict) else None
        now = getattr(getattr(cfg, section), key)
        if then != now:
            raise TitanError(
                f"--resume: {last_path(cfg.logging.checkpoint_path)} holds run {run_name_of(payload)!r} with {section}.{key}={then!r}, "
                f"not {now!r}: resume with the config that started it (--config)"
            )


def check_resumable(cfg: Config, learner: Learner) -> None:
    """For `--resume`, before any service starts: the run in `<stem>_last.pth` trained what `cfg`
    trains, and its learner state loads into `learner` as the trainer will load it. Another config
    (the default one, say, for a run started with --config config/acrobot.yaml) would otherwise
    start every service and fail in the trainer."""
    payload = load_checkpoint(last_path(cfg.logging.checkpoint_path))
    _check_same_run(cfg, payload)
    _check_budget_left(cfg, payload)
    _load_learner(cfg, learner, payload)


def _check_budget_left(cfg: Config, payload: dict[str, Any]) -> None:
    """TitanError if the run has already used the env steps or wall-clock the budget allows: every
    service would start, and the trainer end the run at once."""
    counters, b, name = payload.get("counters") or {}, cfg.budget, run_name_of(payload)
    if (env_steps := int(counters.get("env_steps", 0))) >= b.max_env_steps:
        raise TitanError(
            f"--resume: run {name!r} is at {env_steps:,} env steps already, budget.max_env_steps={b.max_env_steps}: "
            f"set a larger one to train on (budget.max_env_steps={2 * env_steps})"
        )
    if b.max_wall_s and (wall_s := float(counters.get("wall_s", 0.0))) >= b.max_wall_s:
        raise TitanError(
            f"--resume: run {name!r} has trained for {wall_s:.0f}s already, budget.max_wall_s={b.max_wall_s:g}: set a larger one"
        )


def resume_learner(cfg: Config, learner: Learner) -> dict[str, Any]:
    """Load this run's last checkpoint into `learner` and return its counters; {} for a new run."""
    resumed = resume_point(cfg)
    if resumed is None:
        return {}
    _check_same_run(cfg, resumed)  # a trainer started on its own, or restarted with a changed config
    _load_learner(cfg, learner, resumed)
    counters = resumed["counters"]
    log.info(
        "resuming run %s: %d updates, %d env steps, policy v%d",
        cfg.logging.run_name,
        learner.updates,
        counters["env_steps"],
        counters["policy_version"],
    )
    return counters
