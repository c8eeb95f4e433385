"""gRPC face of the rollout service, and the pool of worker processes behind it."""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import queue
import threading
import time

import grpc

from titan_rl.config import Config
from titan_rl.rollout.stats import TrajectoryStats
from titan_rl.v1 import rollout_pb2, rollout_pb2_grpc

log = logging.getLogger(__name__)

RESTART_DELAY_S = 2.0
QUICK_EXIT_S = 60.0
CRASH_LOOP_EXITS = 5
"""A worker that dies this many times in a row, each time sooner than QUICK_EXIT_S after its start
(an error in the algorithm's actor or adder, or in the env), is not started again."""
# titan_rl.rollout.worker exits with these when restarting it would not help
CONFIG_ERROR_EXIT_CODE = 3  # the config cannot work
RUN_FINISHED_EXIT_CODE = 4  # the trainer said training has ended
PEER_GONE_EXIT_CODE = 5  # the trainer or the buffer stayed unreachable for durability.peer_timeout_s


WORKER_MODULE = "titan_rl.rollout.worker"


def _worker_main(*args: object) -> None:
    """Process target. Whichever process a worker is forked from has imported the worker module, so
    it starts with torch and gymnasium already imported."""
    from titan_rl.rollout.worker import run_worker

    run_worker(*args)


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, stats: TrajectoryStats):
        self.stats = stats

    def Stats(self, request: rollout_pb2.StatsRequest, context: grpc.ServicerContext) -> rollout_pb2.StatsResponse:
        return self.stats.snapshot()


class WorkerPool:
    """Starts `num_workers` processes, collects their reports, and restarts a worker that dies,
    after a delay, logging why.

    No worker imports torch and gymnasium again (about 2 CPU-seconds each, the bulk of a CartPole
    run's start-up on two cores): the first ones are forked from this process, which has imported
    the worker module, before it has started a thread or any gRPC (`start` must come first); one
    that replaces a dead worker is forked from a forkserver that imported the module once, started
    then, so no fork copies the live gRPC state or threads.

    A worker that exits because the config cannot work, or a peer is gone, sets `failed`
    instead of restarting: it would fail the same way; so does one caught in a crash loop
    (CRASH_LOOP_EXITS). One that exits because the run has finished sets `finished`."""

    def __init__(self, cfg: Config, stats: TrajectoryStats):
        self.cfg = cfg
        self.stats = stats
        self._ctx = mp.get_context("forkserver")  # its locks and queues also work in forked workers
        self._ctx.set_forkserver_preload([WORKER_MODULE])
        self._stop = self._ctx.Event()
        self._reports = self._ctx.Queue()
        self._procs: dict[int, mp.Process] = {}
        self._started_at: dict[int, float] = {}
        self._quick_exits: dict[int, int] = {}  # per worker, in a row
        self._restart_at: dict[int, float] = {}  # dead workers, when to start their replacements
        self.failed = threading.Event()
        self.finished = threading.Event()
        self.ended = threading.Event()  # failed or finished: the service stops
        self._thread = threading.Thread(target=self._supervise, name="worker-pool", daemon=True)

    def _spawn(self, worker_id: int, ctx: mp.context.BaseContext | None = None) -> None:
        proc = (ctx or self._ctx).Process(
            target=_worker_main, args=(self.cfg, worker_id, self._stop, self._reports), name=f"rollout-worker-{worker_id}", daemon=True
        )
        proc.start()
        self._procs[worker_id] = proc
        self._started_at[worker_id] = time.monotonic()

    def start(self) -> None:
        """Fork the workers, then supervise them on a thread; call before this process starts any
        thread of its own or gRPC server or channel, which a fork would copy half-way."""
        importlib.import_module(WORKER_MODULE)
        for worker_id in range(self.cfg.rollout_server.num_workers):
            self._spawn(worker_id, mp.get_context("fork"))
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stop.is_set():
            try:
                self.stats.record(self._reports.get(timeout=0.5))
            except queue.Empty:
                pass
            for worker_id, proc in list(self._procs.items()):
                if not proc.is_alive() and proc.exitcode == RUN_FINISHED_EXIT_CODE:
                    log.info("the run has finished; stopping the workers")
                    self.finished.set()
                    self.ended.set()
                    return
                if not proc.is_alive() and proc.exitcode in (CONFIG_ERROR_EXIT_CODE, PEER_GONE_EXIT_CODE):
                    why = "cannot run with this config" if proc.exitcode == CONFIG_ERROR_EXIT_CODE else "lost its peer"
                    log.error("rollout worker %d %s (see above); stopping", worker_id, why)
                    self.failed.set()
                    self.ended.set()
                    return
                if not proc.is_alive() and not self._stop.is_set() and worker_id not in self._restart_at:
                    # its age when it was found dead, each worker in this pass alike: none waits behind another's restart
                    quick = time.monotonic() - self._started_at[worker_id] < QUICK_EXIT_S
                    self._quick_exits[worker_id] = self._quick_exits.get(worker_id, 0) + 1 if quick else 0
                    if self._quick_exits[worker_id] >= CRASH_LOOP_EXITS:
                        log.error(
                            "rollout worker %d exited with code %s, %d times in a row within %.0fs of its start (see above): "
                            "another start would fail the same way; stopping",
                            worker_id,
                            proc.exitcode,
                            CRASH_LOOP_EXITS,
                            QUICK_EXIT_S,
                        )
                        self.failed.set()
                        self.ended.set()
                        return
                    log.error("rollout worker %d exited with code %s; restarting in %.0fs", worker_id, proc.exitcode, RESTART_DELAY_S)
                    self._restart_at[worker_id] = time.monotonic() + RESTART_DELAY_S
            for worker_id, at in list(self._restart_at.items()):
                if time.monotonic() >= at and not self._stop.is_set():
                    del self._restart_at[worker_id]
                    self._spawn(worker_id)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for proc in self._procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
