"""What each rollout replica has sent the buffer: env steps, records, finished episodes and the
policy versions it acts with, counted from the chunks stored (a chunk sent twice counts once).
They go into the buffer's snapshots with its tables, so a restarted buffer goes on counting.

The trainer reads these through the buffer (BufferService.Sources), the one service every replica
writes to, so it sees every replica's episodes however many there are and whatever sits in front
of them (a Kubernetes Service would hand a Stats call to one replica only).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from titan_rl.errors import TitanError
from titan_rl.recent_rate import RecentRate
from titan_rl.v1 import buffer_pb2

EPISODE_WINDOW = 100  # the means cover this many of the latest finished episodes
MAX_REPLICAS = 1024  # replicas remembered (the longest silent is forgotten first): the statistics stay small, snapshots too
MAX_WORKERS_PER_REPLICA = 256  # a replica's workers whose policy version it keeps (the earliest seen is forgotten first)
INT32_MIN, INT32_MAX, INT64_MIN, INT64_MAX = -(2**31), 2**31 - 1, -(2**63), 2**63 - 1  # the response's field types
RATE_WINDOW_S = 5.0  # env steps/s over about this long
LIVE_WORKER_S = 30.0  # a worker silent this much longer than its replica's latest chunk no longer holds its acting version back


@dataclass
class _Replica:
    env_steps: int = 0
    records: int = 0
    chunks: int = 0
    episodes: int = 0
    returns: deque[float] = field(default_factory=lambda: deque(maxlen=EPISODE_WINDOW))
    lengths: deque[int] = field(default_factory=lambda: deque(maxlen=EPISODE_WINDOW))
    workers: dict[int, tuple[int, float]] = field(default_factory=dict)
    """Each worker's policy version in its latest chunk, and when that came (-inf: restored from a snapshot)."""
    last_seen: float = 0.0

    def acting_workers(self) -> list[int]:
        """The versions of the workers that still act: those heard from lately, or, before any has
        been since a restore, every one restored. A worker gone for good (one fewer after a restart
        with fewer workers) would hold the replica's acting version back forever."""
        live = [version for version, seen in self.workers.values() if seen >= self.last_seen - LIVE_WORKER_S]
        return live or [version for version, _ in self.workers.values()]


def _mean(values: deque) -> float:
    return sum(values) / len(values) if values else 0.0


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    """`value` (from JSON, where a key is a string) as an int in [lo, hi], what the response's fields hold."""
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if type(value) is not int or not lo <= value <= hi:
        raise TypeError(f"{what} is {value!r}, not an integer in [{lo}, {hi}]")
    return value


def _count(state: Mapping[str, Any], key: str) -> int:
    return _int(state[key], key, 0, INT64_MAX)


def _window(values: Any, kind: type, key: str) -> deque:
    """The latest EPISODE_WINDOW numbers of `values` (a JSON list), each a finite `kind`."""
    if not isinstance(values, list) or not all(type(v) in (int, float) and math.isfinite(v) for v in values):
        raise TypeError(f"{key} is not a list of finite numbers")
    return deque((kind(v) for v in values), maxlen=EPISODE_WINDOW)


class SourceStats:
    """Thread-safe counters per replica, fed by `record` for every chunk stored."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: dict[int, _Replica] = {}
        self._returns: deque[float] = deque(maxlen=EPISODE_WINDOW)  # over every replica, in arrival order
        self._lengths: deque[int] = deque(maxlen=EPISODE_WINDOW)
        self._episodes = 0
        self._env_steps = 0
        self._rate = RecentRate(RATE_WINDOW_S)  # of env steps stored

    def record(
        self,
        replica_id: int,
        worker_id: int,
        env_steps: int,
        records: int,
        policy_version: int,
        episode_returns: list[float],
        episode_lengths: list[int],
        now: float | None = None,
    ) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if (replica := self._replicas.get(replica_id)) is None:
                if len(self._replicas) >= MAX_REPLICAS:
                    del self._replicas[min(self._replicas, key=lambda i: self._replicas[i].last_seen)]
                replica = self._replicas[replica_id] = _Replica()
            replica.env_steps += env_steps
            replica.records += records
            replica.chunks += 1
            replica.episodes += len(episode_returns)
            replica.returns.extend(episode_returns)
            replica.lengths.extend(episode_lengths)
            replica.workers[worker_id] = (policy_version, now)
            if len(replica.workers) > MAX_WORKERS_PER_REPLICA:
                del replica.workers[min(replica.workers, key=lambda w: replica.workers[w][1])]
            replica.last_seen = now
            self._episodes += len(episode_returns)
            self._returns.extend(episode_returns)
            self._lengths.extend(episode_lengths)
            self._env_steps += env_steps
            self._rate.add(now, self._env_steps)

    def response(self, now: float | None = None) -> buffer_pb2.SourcesResponse:
        now = time.monotonic() if now is None else now
        with self._lock:
            sources = [
                buffer_pb2.SourceStats(
                    replica_id=replica_id,
                    env_steps=r.env_steps,
                    records=r.records,
                    chunks=r.chunks,
                    episodes=r.episodes,
                    mean_return=_mean(r.returns),
                    mean_length=_mean(r.lengths),
                    window=len(r.returns),
                    policy_version=min(acting := r.acting_workers()),
                    workers=len(acting),
                    seconds_since_last_chunk=now - r.last_seen,
                )
                for replica_id, r in sorted(self._replicas.items())
            ]
            return buffer_pb2.SourcesResponse(
                sources=sources,
                episodes=self._episodes,
                mean_return=_mean(self._returns),
                mean_length=_mean(self._lengths),
                window=len(self._returns),
                env_steps_per_s=self._rate.per_second(now),
            )

    @property
    def episodes(self) -> int:
        with self._lock:
            return self._episodes

    def state_dict(self) -> dict[str, Any]:
        """The counters and episode windows as plain JSON values, for the buffer's snapshot. What
        is only meaningful in this process (the recent rate, the time of each replica's last chunk)
        stays out: a restored buffer measures those afresh."""
        with self._lock:
            return {
                "replicas": {
                    str(replica_id): {
                        "env_steps": r.env_steps,
                        "records": r.records,
                        "chunks": r.chunks,
                        "episodes": r.episodes,
                        "returns": list(r.returns),
                        "lengths": list(r.lengths),
                        "worker_versions": {str(w): version for w, (version, _) in r.workers.items()},
                    }
                    for replica_id, r in self._replicas.items()
                },
                "episodes": self._episodes,
                "env_steps": self._env_steps,
                "returns": list(self._returns),
                "lengths": list(self._lengths),
            }

    def load_state_dict(self, state: Mapping[str, Any], now: float | None = None) -> None:
        """Take over the counters of `state_dict()` (from a snapshot); every replica counts as heard
        from at `now`. TitanError, with nothing changed, for a state that is not one."""
        now = time.monotonic() if now is None else now
        try:
            replicas = {}
            if len(state["replicas"]) > MAX_REPLICAS:
                raise ValueError(f"{len(state['replicas'])} replicas, more than the {MAX_REPLICAS} a buffer keeps")
            for replica_id, r in state["replicas"].items():
                versions = r["worker_versions"]
                if not versions or len(versions) > MAX_WORKERS_PER_REPLICA:
                    raise TypeError(f"replica {replica_id}: {len(versions)} workers")
                replicas[_int(replica_id, "a replica id", 0, INT32_MAX)] = _Replica(
                    env_steps=_count(r, "env_steps"),
                    records=_count(r, "records"),
                    chunks=_count(r, "chunks"),
                    episodes=_count(r, "episodes"),
                    returns=_window(r["returns"], float, "returns"),
                    lengths=_window(r["lengths"], int, "lengths"),
                    workers={
                        _int(w, "a worker id", INT32_MIN, INT32_MAX): (_int(v, "a policy version", INT64_MIN, INT64_MAX), -math.inf)
                        for w, v in versions.items()
                    },
                    last_seen=now,
                )
            episodes, env_steps = _count(state, "episodes"), _count(state, "env_steps")
            returns, lengths = _window(state["returns"], float, "returns"), _window(state["lengths"], int, "lengths")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TitanError(f"not the replicas' statistics of a buffer snapshot: {e!r}") from e
        with self._lock:
            self._replicas, self._episodes, self._env_steps = replicas, episodes, env_steps
            self._returns, self._lengths = returns, lengths
            self._rate = RecentRate(RATE_WINDOW_S)
