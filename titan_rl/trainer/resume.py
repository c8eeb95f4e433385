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
from titan_rl.checkpoint import last_path, load_checkpoint, run_name_of
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
    except TitanError as e:
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
    except TitanError:
        return None
    returns = payload.get("eval_returns") or []
    if run_name_of(payload) != cfg.logging.run_name or not returns:
        return None
    return float(np.mean(returns))


def resume_learner(cfg: Config, learner: Learner) -> dict[str, Any]:
    """Load this run's last checkpoint into `learner` and return its counters; {} for a new run."""
    resumed = resume_point(cfg)
    if resumed is None:
        return {}
    try:
        learner.load_state_dict(resumed["learner"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise TitanError(f"cannot resume run {cfg.logging.run_name!r} from {last_path(cfg.logging.checkpoint_path)}: {e}") from e
    counters = resumed["counters"]
    log.info(
        "resuming run %s: %d updates, %d env steps, policy v%d",
        cfg.logging.run_name,
        learner.updates,
        counters["env_steps"],
        counters["policy_version"],
    )
    return counters
