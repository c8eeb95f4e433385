"""Which stream each rollout worker sends through: two at once mean two rollout replicas started
with one `rollout_server.replica_id`. Their workers share ids and so seeds: every episode would
reach the replay twice, and each replica's statistics would be the two mixed.

A worker's chunks come from one sender (`RecordChunk.sender_id`, random per sender). A restarted
worker has a new sender, which replaces the old one; the old one never sends again. A sender that
was replaced and sends again is the other replica's worker of the same id.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque

MAX_WORKERS = 65_536  # workers remembered, the least recently heard from forgotten first
MAX_REPLACED = 8  # senders remembered per worker as replaced


class WorkerSenders:
    """Thread-safe: the sender of each (replica, worker), and the senders it replaced."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._replaced: dict[tuple[int, int], deque[int]] = {}

    def claim(self, replica_id: int, worker_id: int, sender_id: int) -> str | None:
        """None if `sender_id` may send for worker `worker_id` of replica `replica_id` (it does, or
        it replaces the one that did); else why not, naming the replica id."""
        worker = (replica_id, worker_id)
        with self._lock:
            current = self._current.get(worker)
            if current is not None and current != sender_id:
                replaced = self._replaced.setdefault(worker, deque(maxlen=MAX_REPLACED))
                if sender_id in replaced:
                    return (
                        f"worker {worker_id} of rollout replica {replica_id} sends through two streams at once: "
                        f"are two rollout replicas started with rollout_server.replica_id={replica_id}?"
                    )
                replaced.append(current)
            self._current[worker] = sender_id
            self._current.move_to_end(worker)
            if len(self._current) > MAX_WORKERS:
                forgotten, _ = self._current.popitem(last=False)
                self._replaced.pop(forgotten, None)
        return None
