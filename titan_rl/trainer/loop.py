"""The learner loop: batches in, updates, weights out, evaluation, logging, checkpoints, budget."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from titan_rl.checkpoint import last_path, save_checkpoint
from titan_rl.config import Config
from titan_rl.metrics import MetricsLogger
from titan_rl.rollout.actor import evaluate_greedy
from titan_rl.rollout.client import RolloutClient
from titan_rl.trainer.policy_store import PolicyStore
from trainers.base import Trainer

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.5


class BatchSource(Protocol):
    inserts_total: int

    def next(self, timeout_s: float | None = None) -> dict[str, np.ndarray] | None: ...


@dataclass
class Summary:
    stop_reason: str
    env_steps: int
    updates: int
    policy_version: int
    wall_s: float
    best_eval_return: float | None
    last_eval_return: float | None
    checkpoint: str
    last_checkpoint: str


class TrainingLoop:
    """Runs `trainer.update` on batches from `batches` until a budget is met or `stop()` is called.

    Env steps are counted by the buffer (every stored transition is one env step), so the
    count is right however many rollout replicas feed it.
    """

    def __init__(
        self,
        cfg: Config,
        trainer: Trainer,
        batches: BatchSource,
        store: PolicyStore,
        logger: MetricsLogger,
        rollout: RolloutClient | None = None,
    ):
        self.cfg, self.trainer, self.batches, self.store, self.logger, self.rollout = cfg, trainer, batches, store, logger, rollout
        self.state = "waiting_for_data"
        self.env_steps = 0
        self.best_eval: float | None = None
        self.last_eval: float | None = None
        self.last_metrics: dict[str, float] = {}
        self.checkpoint_lock = threading.Lock()
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._evals = 0

    def stop(self) -> None:
        self._stop.set()

    def wall_s(self) -> float:
        return time.monotonic() - self._start

    def _budget_reason(self) -> str | None:
        b = self.cfg.budget
        if self._stop.is_set():
            return "stop requested"
        if self.env_steps >= b.max_env_steps:
            return f"budget.max_env_steps={b.max_env_steps} reached"
        if b.max_wall_s and self.wall_s() >= b.max_wall_s:
            return f"budget.max_wall_s={b.max_wall_s:g} reached"
        if b.target_eval_return is not None and self.last_eval is not None and self.last_eval >= b.target_eval_return:
            return f"eval return {self.last_eval:.1f} >= budget.target_eval_return={b.target_eval_return:g}"
        return None

    def run(self) -> Summary:
        t = self.cfg.train
        self._start = time.monotonic()
        if self.store.version < 0:
            self.store.publish(self.trainer.policy.state_dict())
        next_eval = self.cfg.eval.interval_env_steps
        next_log = 0.0
        window: dict[str, list[float]] = defaultdict(list)
        updates_at_log, steps_at_log, time_at_log = 0, 0, self._start
        evaluated_at = -1
        while (reason := self._budget_reason()) is None:
            batch = self.batches.next(timeout_s=WAIT_POLL_S)
            if batch is None:
                self.logger.console(self.env_steps, f"{self.state}: buffer holds back batches (min_buffer_size={t.min_buffer_size})")
                continue
            self.state = "training"
            with self.checkpoint_lock:  # a Checkpoint call never sees half an update
                metrics = self.trainer.update(batch)
            for key, value in metrics.items():
                window[key].append(value)
            if self.trainer.updates % t.policy_sync_every_updates == 0:
                self.store.publish(self.trainer.policy.state_dict())
            self.env_steps = self.batches.inserts_total
            if self.env_steps >= next_eval:
                self._evaluate()
                evaluated_at = self.env_steps
                next_eval = (self.env_steps // self.cfg.eval.interval_env_steps + 1) * self.cfg.eval.interval_env_steps
            if (now := time.monotonic()) >= next_log:
                elapsed = max(now - time_at_log, 1e-9)
                rates = {
                    "charts/updates_per_s": (self.trainer.updates - updates_at_log) / elapsed,
                    "charts/learner_env_steps_per_s": (self.env_steps - steps_at_log) / elapsed,
                }
                self._log({**{k: float(np.mean(v)) for k, v in window.items()}, **rates})
                window.clear()
                updates_at_log, steps_at_log, time_at_log = self.trainer.updates, self.env_steps, now
                next_log = now + self.cfg.logging.log_interval_s
        self.state = "stopping"
        log.info("stopping: %s", reason)
        if evaluated_at != self.env_steps and not self._stop.is_set():
            self._evaluate()
        last = self.save(last_path(self.cfg.logging.checkpoint_path))
        summary = Summary(
            stop_reason=reason,
            env_steps=self.env_steps,
            updates=self.trainer.updates,
            policy_version=self.store.version,
            wall_s=round(self.wall_s(), 3),
            best_eval_return=self.best_eval,
            last_eval_return=self.last_eval,
            checkpoint=self.cfg.logging.checkpoint_path if self.best_eval is not None else str(last),
            last_checkpoint=str(last),
        )
        (self.logger.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
        self.state = "done"
        return summary

    def _greedy_returns(self) -> list[float]:
        e = self.cfg.eval
        seed = 1_000_003 * (self.cfg.seed + 1) + self._evals * e.episodes  # fresh episodes every time
        self._evals += 1
        return evaluate_greedy(self.trainer.policy, self.cfg.rollout_server.env_name, e.episodes, seed)

    def _evaluate(self) -> None:
        """Score the greedy policy; a score that reaches the target is confirmed on as many new episodes.

        One lucky set of episodes must not end training: the score that stops it, and the one a
        best checkpoint is kept for, is then the mean over both sets.
        """
        returns = self._greedy_returns()
        target = self.cfg.budget.target_eval_return
        if target is not None and np.mean(returns) >= target:
            returns += self._greedy_returns()
        self.last_eval = float(np.mean(returns))
        improved = self.best_eval is None or self.last_eval > self.best_eval
        if improved:
            self.best_eval = self.last_eval
            self.save(self.cfg.logging.checkpoint_path, returns)
        self._log({"eval/mean_return": self.last_eval, "eval/min_return": float(np.min(returns)), "eval/best_mean_return": self.best_eval})
        log.debug("eval at %d env steps: %.1f%s", self.env_steps, self.last_eval, " (best)" if improved else "")

    def _log(self, metrics: dict[str, float]) -> None:
        stats = self.rollout.stats() if self.rollout is not None else None
        if stats is not None:
            metrics.update({"charts/policy_version_acting": float(stats.policy_version), "charts/env_steps_per_s": stats.steps_per_second})
            if stats.window:
                metrics.update({"charts/episodic_return": stats.mean_return, "charts/episodic_length": stats.mean_length})
        metrics.update(
            {
                "charts/updates": float(self.trainer.updates),
                "charts/policy_version": float(self.store.version),
                "charts/wall_s": self.wall_s(),
                "charts/time": time.time(),
            }
        )
        self.last_metrics.update(metrics)
        self.logger.log(metrics, self.env_steps)
        m = self.last_metrics
        ev = "-" if self.last_eval is None else f"{self.last_eval:.1f} (best {self.best_eval:.1f})"
        self.logger.console(
            self.env_steps,
            f"{m.get('charts/env_steps_per_s', 0):,.0f} steps/s | return {m.get('charts/episodic_return', 0):.1f} | "
            f"eval {ev} | loss {m.get('losses/td_loss', float('nan')):.4f} | policy v{self.store.version}",
        )

    def save(self, path: str | Path, eval_returns: list[float] | None = None) -> Path:
        counters = {
            "updates": self.trainer.updates,
            "env_steps": self.env_steps,
            "policy_version": self.store.version,
            "wall_s": self.wall_s(),
        }
        with self.checkpoint_lock:
            return save_checkpoint(path, self.cfg, self.trainer.state_dict(), counters, eval_returns)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "updates": self.trainer.updates,
            "env_steps": self.env_steps,
            "policy_version": self.store.version,
            "best_eval_return": self.best_eval if self.best_eval is not None else float("nan"),
            "last_eval_return": self.last_eval if self.last_eval is not None else float("nan"),
            "metrics": {k: float(v) for k, v in self.last_metrics.items()},
        }
