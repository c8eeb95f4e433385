"""A trainer's W&B run, opened and written by a process of its own.

Opening a run costs about a CPU-second of Python (wandb's imports, `wandb.init`), and every
`run.log` some more. On a thread of the trainer all of it held the GIL the learner needs between
torch calls: with W&B offline the first update of a CartPole run came ~0.7 s later than with W&B
disabled (docs/benchmarks.md, "W&B off the learner's process"). This child is forked before the
trainer has any thread or gRPC (as its evaluator is), lowers its own CPU priority so that the
services' start-up comes first on a small machine, and takes rows from a queue that never blocks
the learner: rows logged while the run opens wait there and reach W&B in order.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
from pathlib import Path
from typing import Any

from titan_rl.errors import TitanError

log = logging.getLogger(__name__)

NICENESS = 10
"""How far the writer lowers its CPU priority: under the services while they start, still scheduled
on the core they leave idle once training runs."""

FINISH_TIMEOUT_S = 300.0
"""How long `close` waits for the run to finish (an online run uploads what is left) before it kills the writer."""


class WandbWriter:
    """`log(metrics, env_steps)` and `log_video(path, env_steps)` send to the W&B run the child opens
    with `init_kwargs` (`wandb.init`'s). The child reports where the run is once it is open, and
    its first failure, which the next `log` raises.

    `start_method` "fork" where the caller has no thread or gRPC yet and need not pay the child
    an import of its main module (the trainer); "spawn" (the default) anywhere else.

    A writer killed by a signal (an out-of-memory kill, a SIGTERM sent to the trainer's whole
    process group while it stops) ends W&B logging with a warning, not the run: the rows still
    reach metrics.jsonl.
    """

    def __init__(self, init_kwargs: dict[str, Any], start_method: str = "spawn"):
        ctx = mp.get_context(start_method)
        self._requests = ctx.Queue()
        self._reports = ctx.Queue()
        self._error: str | None = None
        self._gone = False  # killed by a signal, and said so
        self._closed = False
        self._process = ctx.Process(
            target=_writer_main, args=(init_kwargs, self._requests, self._reports), name="wandb-writer", daemon=True
        )

    def start(self) -> None:
        """Start the writer; it opens the run at once, at a lower CPU priority."""
        self._process.start()

    def log(self, metrics: dict[str, Any], env_steps: int) -> None:
        self._send(("row", metrics, env_steps))

    def log_video(self, path: Path, env_steps: int) -> None:
        self._send(("video", str(path), env_steps))

    def read_reports(self) -> None:
        """Log what the writer said since the last call: where the run is, or why it failed."""
        with contextlib.suppress(queue.Empty):
            while True:
                kind, text = self._reports.get_nowait()
                if kind == "opened":
                    log.info("W&B run: %s", text)
                elif self._error is None:
                    log.error("W&B run failed: %s", text)
                    self._error = text

    def _send(self, request: tuple[Any, ...]) -> None:
        self.read_reports()
        if self._error is not None:
            raise TitanError(f"W&B run failed: {self._error}")
        if self._gone:
            return
        if not self._process.is_alive():
            self.read_reports()  # its last words, if it failed and exited
            if self._error is not None:
                raise TitanError(f"W&B run failed: {self._error}")
            code = self._process.exitcode
            if code is not None and code < 0:
                log.warning("the W&B writer was killed by signal %d: W&B gets no more rows (metrics.jsonl does)", -code)
                self._gone = True
                return
            raise TitanError(f"the W&B writer process exited with code {code}")
        self._requests.put(request)

    def close(self) -> None:
        """Finish the run: every row sent reaches it first."""
        if self._process.pid is None or self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError, OSError):
            self._requests.put(None)
        self._process.join(FINISH_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("the W&B run did not finish in %.0fs: its writer is stopped, the run may lack its last rows", FINISH_TIMEOUT_S)
            self._process.kill()
            self._process.join(5.0)
        self.read_reports()
        if self._process.exitcode and self._error is None and not self._gone:
            log.warning("the W&B writer exited with code %d", self._process.exitcode)
        # rows no writer will read: without this, exit would wait for the queue's feeder thread,
        # blocked on a full pipe, for good
        self._requests.cancel_join_thread()
        self._requests.close()
        self._reports.close()


def _writer_main(init_kwargs: dict[str, Any], requests: Any, reports: Any) -> None:
    """The writer process: open the run, then log every request until None.

    Failures are reported to the trainer, which logs them: this process's own log handlers are
    the trainer's at the fork, before its console view or a redirection after a hangup."""
    from titan_rl.service import exit_with_parent_process, leave_stop_signals_to_parent

    leave_stop_signals_to_parent()  # the trainer ends it through `requests`
    exit_with_parent_process()  # a trainer that dies without a word
    os.nice(NICENESS)
    mode = init_kwargs["mode"]
    os.environ["WANDB_MODE"] = mode  # an env var, not just init(mode=...): no network attempt at all offline
    os.environ["WANDB_SILENT"] = "true"  # no banners, sparklines or sync hints: the trainer logs where the run is
    run = None
    try:
        import wandb

        # console off: W&B would capture this process's output, not the trainer's
        run = wandb.init(**init_kwargs, settings=wandb.Settings(console="off"))
        where = run.url if mode == "online" else f"{Path(run.dir).parent} (`wandb sync` uploads it)"
        reports.put(("opened", f"{mode}, {where}"))
    except Exception as e:
        _failed(reports, "could not start", e)
    while (request := requests.get()) is not None:
        if run is None:
            continue  # drained, so the trainer's queue never fills
        kind, payload, env_steps = request
        try:
            if kind == "video":
                run.log({"video/greedy_episode": wandb.Video(payload, format="mp4")}, step=env_steps)
            else:
                run.log(payload, step=env_steps)
        except Exception as e:
            _failed(reports, "could not take a row", e)
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)
            run = None
    if run is not None:
        try:
            run.finish()
        except Exception as e:
            _failed(reports, "could not finish", e)
    with contextlib.suppress(Exception):
        wandb.teardown()  # this process leaves through os._exit: wandb-core is told here, not by an exit hook


def _failed(reports: Any, what: str, error: Exception) -> None:
    reports.put(("error", f"{what}: {type(error).__name__}: {error}"))
