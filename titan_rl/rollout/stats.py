"""Aggregates worker reports into the trajectory statistics the Stats call serves."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from titan_rl.recent_rate import RecentRate
from titan_rl.v1 import rollout_pb2


@dataclass
class WorkerReport:
    """What a worker tells the rollout service every half second (plain data: crosses a process boundary)."""

    worker_id: int
    env_steps: int
    actor_metrics: dict[str, float]
    policy_version: int
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)


EPISODE_WINDOW = 100
RATE_WINDOW_S = 5.0


class TrajectoryStats:
    def __init__(self, num_workers: int):
        self._lock = threading.Lock()
        self._workers = {i: rollout_pb2.WorkerStats(worker_id=i, policy_version=-1) for i in range(num_workers)}
        self._returns: deque[float] = deque(maxlen=EPISODE_WINDOW)
        self._lengths: deque[int] = deque(maxlen=EPISODE_WINDOW)
        self._episodes = 0
        self._rate = RecentRate(RATE_WINDOW_S)  # of total env steps

    def record(self, report: WorkerReport, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            w = self._workers[report.worker_id]
            w.env_steps, w.policy_version = report.env_steps, report.policy_version
            w.actor_metrics.clear()
            w.actor_metrics.update(report.actor_metrics)
            w.episodes += len(report.episode_returns)
            self._episodes += len(report.episode_returns)
            self._returns.extend(report.episode_returns)
            self._lengths.extend(report.episode_lengths)
            self._rate.add(now, self._total_steps())

    def _total_steps(self) -> int:
        return sum(w.env_steps for w in self._workers.values())

    def snapshot(self) -> rollout_pb2.StatsResponse:
        with self._lock:
            n = len(self._returns)
            return rollout_pb2.StatsResponse(
                env_steps=self._total_steps(),
                episodes=self._episodes,
                mean_return=sum(self._returns) / n if n else 0.0,
                mean_length=sum(self._lengths) / n if n else 0.0,
                last_return=self._returns[-1] if n else 0.0,
                window=n,
                steps_per_second=self._rate.per_second(),
                policy_version=min(w.policy_version for w in self._workers.values()),
                workers=list(self._workers.values()),
            )
