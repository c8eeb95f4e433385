"""The learner loop: batches in, learner updates, weights out, evaluation, logging, checkpoints, budget.

It knows nothing of the algorithm but the `Learner` contract: any table's batches go to
`learner.update`, new priorities (if the learner set them) go back to the buffer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from titan_rl.algorithm import Learner, to_batch
from titan_rl.checkpoint import last_path, save_checkpoint
from titan_rl.clients.buffer import PriorityUpdater, Sample
from titan_rl.config import Config
from titan_rl.evaluation import EvalJob, EvalResult, Evaluator, confirmation_bar, eval_seed, snapshot
from titan_rl.metrics import MetricsLogger
from titan_rl.trainer.distributed import LearnerGroup
from titan_rl.trainer.policy_store import PolicyStore
from titan_rl.v1 import buffer_pb2

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.5
EVAL_WAIT_S = 120.0
LEARNER_LOST = "a learner process stopped; the run can be resumed"
LIVE_SOURCE_S = 30.0  # a replica that sent no chunk for this long no longer counts towards the acting version
WAITING_LOG_S = (10.0, 60.0)  # waiting for batches is logged, with why, this long after the start, then this often
WAITING_ASK_S = 5.0  # how often the console's waiting line asks the buffer again
NO_DATA = "no batch came from the buffer"  # a stop reason that begins so: the run failed (the trainer exits 1)


class BatchSource(Protocol):
    env_steps_total: int

    def next(self, timeout_s: float | None = None) -> Sample | None: ...


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


def source_metrics(stats: buffer_pb2.SourcesResponse) -> dict[str, float]:
    """What the buffer says the rollout replicas sent: over all of them, and per replica under
    `replicas/<id>/`. The acting version is the oldest among replicas heard from lately (one that
    stopped would hold it back for good)."""
    if not stats.sources:
        return {}
    live = [s for s in stats.sources if s.seconds_since_last_chunk <= LIVE_SOURCE_S] or list(stats.sources)
    metrics = {
        "charts/env_steps_per_s": stats.env_steps_per_s,
        "charts/policy_version_acting": float(min(s.policy_version for s in live)),
        "charts/rollout_replicas": float(len(live)),
        "charts/dropped_stale_records": float(stats.dropped_stale_total),  # acted by weights too old to learn from
    }
    if stats.window:
        metrics.update({"charts/episodic_return": stats.mean_return, "charts/episodic_length": stats.mean_length})
    for s in stats.sources:
        metrics[f"replicas/{s.replica_id}/env_steps"] = float(s.env_steps)
        metrics[f"replicas/{s.replica_id}/episodes"] = float(s.episodes)
        if s.window:
            metrics[f"replicas/{s.replica_id}/episodic_return"] = s.mean_return
    return metrics


class TrainingLoop:
    """Runs `learner.update` on batches from `batches` until a budget is met or `stop()` is called.

    Env steps are counted by the buffer (every chunk says how many it covers), so the count is
    right however many rollout replicas feed it. Evaluation runs in `evaluator`'s process.
    """

    def __init__(
        self,
        cfg: Config,
        learner: Learner,
        batches: BatchSource,
        store: PolicyStore,
        logger: MetricsLogger,
        evaluator: Evaluator,
        sources: Callable[[], buffer_pb2.SourcesResponse | None] | None = None,
        priorities: PriorityUpdater | None = None,
        group: LearnerGroup | None = None,
    ):
        self.cfg, self.learner, self.batches, self.store, self.logger = cfg, learner, batches, store, logger
        self.evaluator, self.sources, self.priorities = evaluator, sources, priorities
        self.group = group  # data-parallel learners: every update is agreed with the other ranks first
        self._failure: str | None = None
        self.state = "waiting_for_data"
        self.waiting_for = ""  # why, while waiting for a batch
        self.env_steps = 0
        self.best_eval: float | None = None
        self.last_eval: float | None = None
        self.last_metrics: dict[str, float] = {}
        self.checkpoint_lock = threading.Lock()
        self._stop = threading.Event()
        self.ends_run = True  # once it stops: does the run end with it?
        self._start = time.monotonic()
        self._evals = 0
        self._evaluated_at = -1
        self._loss_key = ""
        self._reached: EvalJob | None = None  # the evaluation that reached budget.target_eval_return
        self._wall_before_s = 0.0  # wall-clock of the run before this trainer resumed it
        self._buffer_env_steps = 0  # the buffer's own count, as last seen
        self._env_steps_lost = 0  # steps the buffer counted and then lost in a restart: still steps taken

    def resume(self, counters: dict[str, Any]) -> None:
        """Continue the counters of a checkpoint of this run (the learner's own state is loaded apart)."""
        self.env_steps = int(counters["env_steps"])
        self._wall_before_s = float(counters["wall_s"])
        self._buffer_env_steps = int(counters.get("buffer_env_steps", self.env_steps))
        self._env_steps_lost = int(counters.get("env_steps_lost", 0))
        self._evals = int(counters.get("evals", 0))

    def _count_env_steps(self, buffer_env_steps: int) -> None:
        """The run's env steps from the buffer's count, which restarts lower when the buffer does:
        the steps it lost (since its snapshot) were still taken, so the run's count never goes back."""
        if buffer_env_steps < self._buffer_env_steps:
            lost = self._buffer_env_steps - buffer_env_steps
            self._env_steps_lost += lost
            log.warning("the buffer's env-step count went back by %d (a restart): the run's count continues", lost)
        self._buffer_env_steps = buffer_env_steps
        self.env_steps = max(self.env_steps, buffer_env_steps + self._env_steps_lost)

    def stop(self, end_run: bool = True) -> None:
        """Stop training. `end_run`: the run is over (the actors and the buffer are told, and exit);
        False (SIGTERM, as when Kubernetes moves the pod): this trainer stops, the run goes on and a
        restarted trainer resumes it. Once the loop has ended, whether the run ends with it is decided:
        a later call (a SIGTERM during the final evaluation) only cuts that evaluation short."""
        if self.state not in ("stopping", "done"):
            self.ends_run = end_run
        self._stop.set()

    def wall_s(self) -> float:
        """Seconds of training in this run, across restarts of the trainer."""
        return self._wall_before_s + time.monotonic() - self._start

    def _budget_reason(self) -> str | None:
        b = self.cfg.budget
        if self._failure is not None:
            return self._failure
        if self._stop.is_set():
            return "stop requested" if self.ends_run else "trainer stopped by a signal; the run can be resumed"
        if self.env_steps >= b.max_env_steps:
            return f"budget.max_env_steps={b.max_env_steps} reached"
        if b.max_wall_s and self.wall_s() >= b.max_wall_s:
            return f"budget.max_wall_s={b.max_wall_s:g} reached"
        if b.target_eval_return is not None and self.last_eval is not None and self.last_eval >= b.target_eval_return:
            return f"eval return {self.last_eval:.1f} >= budget.target_eval_return={b.target_eval_return:g}"
        return None

    def publish(self) -> int:
        return self.store.publish(self.learner.network.state_dict(), self.env_steps)

    def run(self) -> Summary:
        t = self.cfg.train
        self._start = time.monotonic()
        if self.store.version < 0:
            self.publish()
        next_eval = self.cfg.eval.interval_env_steps
        save_every_s = self.cfg.durability.checkpoint_interval_s
        next_save = self._start + save_every_s
        window: dict[str, list[float]] = defaultdict(list)
        # the rates count from the first batch, once the buffer's count is in: neither a resumed run's
        # counts nor the wait for data (nor the actors' steps while the trainer was away) are this start's
        updates_at_log, steps_at_log, time_at_log, next_log = 0, 0, None, math.inf
        waited_s = 0.0  # in batches.next since the last log: the actors (or the rate limiter) held the learner back
        logged_first_update = False
        device = self.learner.device
        next_waiting_log, waiting_asked_at = self._start + WAITING_LOG_S[0], -math.inf
        while (reason := self._budget_reason()) is None:
            for result in self.evaluator.results():
                self._record_eval(result)
            if self._reached is not None:  # no update after the weights that end the run
                continue
            asked_at = time.monotonic()
            sample = self.batches.next(timeout_s=WAIT_POLL_S)
            if sample is None:
                if (now := time.monotonic()) >= waiting_asked_at + WAITING_ASK_S:
                    self.waiting_for, waiting_asked_at = self._why_no_batch(), now
                    self.logger.console(self.env_steps, f"{self.state}: {self.waiting_for}")
                if self.state == "waiting_for_data" and now >= next_waiting_log:
                    log.warning("no batch yet after %.0fs: %s", now - self._start, self.waiting_for)
                    next_waiting_log = now + WAITING_LOG_S[1]
                waited_s += time.monotonic() - asked_at  # asking the buffer why included
                continue
            waited_s += time.monotonic() - asked_at
            if self.state != "training":  # a spawned evaluator starts now, not during the services' start-up
                self.evaluator.start()
            self.state = "training"
            batch = to_batch(sample.fields, sample.keys, sample.weights, device)
            self._count_env_steps(sample.env_steps_total)
            if time_at_log is None:
                updates_at_log, steps_at_log, time_at_log, waited_s = self.learner.updates, self.env_steps, time.monotonic(), 0.0
                next_log = time_at_log + self.cfg.logging.log_interval_s
            self.learner.env_steps = self.env_steps  # rank 0's count: every learner rank's clock
            if self.group is not None and not self.group.agree(True, self.env_steps):
                self._learner_lost()
                continue
            with self.checkpoint_lock:  # a Checkpoint call never sees half an update
                try:
                    metrics = self.learner.update(batch)
                except RuntimeError as e:  # a rank gone mid-update fails its backward pass, before the step
                    if self.group is None or not self.group.failed(e):
                        raise
                    self._learner_lost()
                    continue
            if batch.new_priorities is not None and self.priorities is not None:
                self.priorities.put(batch.keys, batch.new_priorities)
            self._loss_key = self._loss_key or next((k for k in metrics if k.startswith("losses/")), "")
            for key, value in metrics.items():
                window[key].append(value)
            if self.learner.updates % t.policy_sync_every_updates == 0:
                self.publish()
            if self.env_steps >= next_eval and self._submit_eval():
                next_eval = (self.env_steps // self.cfg.eval.interval_env_steps + 1) * self.cfg.eval.interval_env_steps
            if not logged_first_update:  # when learning began, to the update; the rates come a log interval later
                self._log({k: float(np.mean(v)) for k, v in window.items()})
                window.clear()
                logged_first_update = True
            if (now := time.monotonic()) >= next_log:
                elapsed = max(now - time_at_log, 1e-9)
                rates = {
                    "charts/updates_per_s": (self.learner.updates - updates_at_log) / elapsed,
                    "charts/learner_env_steps_per_s": (self.env_steps - steps_at_log) / elapsed,
                    "charts/learner_wait_fraction": min(waited_s / elapsed, 1.0),
                }
                self._log({**{k: float(np.mean(v)) for k, v in window.items()}, **rates})
                window.clear()
                updates_at_log, steps_at_log, time_at_log, waited_s = self.learner.updates, self.env_steps, now, 0.0
                next_log = now + self.cfg.logging.log_interval_s
            if save_every_s and now >= next_save:
                self.save(last_path(self.cfg.logging.checkpoint_path))
                next_save = now + save_every_s
        self.state = "stopping"
        run_ends = self.ends_run and self._failure is None
        learned = self.learner.updates > 0
        if not learned and run_ends and not self._stop.is_set():  # a budget ran out
            reason = f"{NO_DATA} before {reason}: {self._why_no_batch()}"
        log.info("stopping: %s", reason)
        if self.group is not None:  # before the final evaluation: the other ranks are not kept waiting at an agree
            self.group.close(run_ended=run_ends)
        if learned:  # an untrained network is not kept as the run's best policy
            self._final_eval()
        last = self._save_last(run_ends)
        summary = Summary(
            stop_reason=reason,
            env_steps=self.env_steps,
            updates=self.learner.updates,
            policy_version=self.store.version,
            wall_s=round(self.wall_s(), 3),
            best_eval_return=self.best_eval,
            last_eval_return=self.last_eval,
            checkpoint=self.cfg.logging.checkpoint_path if self.best_eval is not None else str(last),
            last_checkpoint=str(last),
        )
        path = self.logger.run_dir / "summary.json"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(summary), indent=2))
        os.replace(tmp, path)  # whole or not at all, for the launcher and benchmarks that read it
        self.state = "done"
        return summary

    def _why_no_batch(self) -> str:
        """Why the buffer lends no batch, as far as its Sources call tells."""
        t, address = self.cfg.train, self.cfg.buffer_server.dial_address
        stats = self.sources() if self.sources is not None else None
        if stats is None:
            return f"the buffer at {address} does not answer"
        if not stats.sources:
            return f"no rollout replica has sent a record to the buffer at {address}: are they running, with this run's token and address?"
        env_steps = sum(s.env_steps for s in stats.sources)
        if (quiet_s := min(s.seconds_since_last_chunk for s in stats.sources)) > LIVE_SOURCE_S:
            return f"no rollout replica has sent a chunk for {quiet_s:.0f}s ({env_steps:,} env steps before)"
        return (
            f"{len(stats.sources)} rollout replica(s) sent {env_steps:,} env steps; the buffer lends batches from "
            f"train.min_buffer_size={t.min_buffer_size:,} records on, as fast as its rate limiter allows "
            "(on-policy: of records acted by weights recent enough)"
        )

    def _save_last(self, run_ends: bool) -> Path:
        """The last checkpoint: the learner now, or, where the target ended the run, the snapshot
        that reached it. Evaluation runs beside learning, and the updates made while it ran (160-290
        on CartPole) took the last policy of 7 of 20 runs whose evaluation had confirmed ≥ 495 to
        120-452 on 20 fresh episodes. A trainer stopped to be resumed keeps the learner: the run goes on."""
        path = last_path(self.cfg.logging.checkpoint_path)
        if self._reached is None or not run_ends:
            return self.save(path)
        return self.save(path, state=self._reached.state, env_steps=self._reached.env_steps)

    def _learner_lost(self) -> None:
        self._failure = LEARNER_LOST
        self.ends_run = False

    def _submit_eval(self) -> bool:
        """Hand a snapshot of the learner to the evaluator; False while it is busy with the last one."""
        if not self.evaluator.idle:
            return False
        e = self.cfg.eval
        seed = eval_seed(self.cfg.seed, self._evals, e.episodes)
        with self.checkpoint_lock:
            state = snapshot(self.learner.state_dict())
        confirm = confirmation_bar(self.best_eval, self.cfg.budget.target_eval_return)
        self.evaluator.submit(EvalJob(self.env_steps, state, seed, seed + e.episodes, confirm))
        self._evals += 1
        self._evaluated_at = self.env_steps
        return True

    def _final_eval(self) -> None:
        """Wait for a running evaluation, and score the final weights unless they were scored, the target
        was reached (the best checkpoint holds the weights that reached it) or stop was asked."""
        for result in self.evaluator.results(wait_s=EVAL_WAIT_S):
            self._record_eval(result)
        reached = self._reached is not None
        if self._evaluated_at != self.env_steps and not reached and not self._stop.is_set() and self._submit_eval():
            for result in self.evaluator.results(wait_s=EVAL_WAIT_S):
                self._record_eval(result)

    def _record_eval(self, result: EvalResult) -> None:
        """Keep the score, and a best checkpoint of exactly the weights that earned it."""
        returns = result.returns
        self.last_eval = float(np.mean(returns))
        improved = self.best_eval is None or self.last_eval > self.best_eval
        if improved:
            self.best_eval = self.last_eval
            self.save(self.cfg.logging.checkpoint_path, returns, state=result.job.state, env_steps=result.job.env_steps)
        target = self.cfg.budget.target_eval_return
        if self._reached is None and target is not None and self.last_eval >= target:
            self._reached = result.job
        metrics = {"eval/mean_return": self.last_eval, "eval/min_return": float(np.min(returns)), "eval/best_mean_return": self.best_eval}
        self._log(metrics, result.job.env_steps)
        log.debug("eval at %d env steps: %.1f%s", result.job.env_steps, self.last_eval, " (best)" if improved else "")

    def _log(self, metrics: dict[str, float], env_steps: int | None = None) -> None:
        stamped = {  # before asking the buffer (up to 1 s): the row's time is the learner's
            "charts/updates": float(self.learner.updates),
            "charts/policy_version": float(self.store.version),
            "charts/wall_s": self.wall_s(),
            "charts/time": time.time(),
        }
        if self.sources is not None and (stats := self.sources()) is not None:
            metrics.update(source_metrics(stats))
        metrics.update(stamped)
        self.last_metrics = {**self.last_metrics, **metrics}  # replaced, not changed: Status reads it from a server thread
        self.logger.log(metrics, self.env_steps if env_steps is None else max(env_steps, 0))
        m = self.last_metrics
        ev = "-" if self.last_eval is None else f"{self.last_eval:.1f} (best {self.best_eval:.1f})"
        lag = "-" if "charts/policy_version_acting" not in m else f"{self.store.version - m['charts/policy_version_acting']:.0f}"
        self.logger.console(
            self.env_steps,
            f"{_shown(m, 'charts/env_steps_per_s', ',.0f')} steps/s | {_shown(m, 'charts/updates_per_s', ',.0f')} updates/s | "
            f"return {_shown(m, 'charts/episodic_return', '.1f')} | eval {ev} | "
            f"{self._loss_key.removeprefix('losses/') or 'loss'} {_shown(m, self._loss_key, '.4f')} | "
            f"policy v{self.store.version} (lag {lag})",
        )

    def save(
        self, path: str | Path, eval_returns: list[float] | None = None, state: dict[str, Any] | None = None, env_steps: int | None = None
    ) -> Path:
        """Write the learner's state (or `state`, a snapshot taken at `env_steps`) with the run's counters."""
        with self.checkpoint_lock:
            state = state if state is not None else self.learner.state_dict()
            counters = {
                "updates": int(state["updates"]),
                "env_steps": self.env_steps if env_steps is None else env_steps,
                "policy_version": self.store.version,
                "wall_s": self.wall_s(),
                "buffer_env_steps": self._buffer_env_steps,
                "env_steps_lost": self._env_steps_lost,
                "evals": self._evals,
            }
            return save_checkpoint(path, self.cfg, state, counters, eval_returns)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "updates": self.learner.updates,
            "env_steps": self.env_steps,
            "policy_version": self.store.version,
            "best_eval_return": self.best_eval if self.best_eval is not None else float("nan"),
            "last_eval_return": self.last_eval if self.last_eval is not None else float("nan"),
            "metrics": {k: float(v) for k, v in self.last_metrics.items()},
        }


def _shown(metrics: dict[str, float], key: str, spec: str) -> str:
    """A console figure, or "-" before its first measurement (an evaluation row can come before the
    first rates, which read "0 updates/s | loss nan")."""
    return format(metrics[key], spec) if key in metrics else "-"
