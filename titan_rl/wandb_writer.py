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
    the first failure, which the next `log` raises (the failure itself is logged when it happens)."""

    def __init__(self, init_kwargs: dict[str, Any], start_method: str = "fork"):
        ctx = mp.get_context(start_method)
        self._requests = ctx.Queue()
        self._reports = ctx.Queue()
        self._error: str | None = None
        self._process = ctx.Process(
            target=_writer_main, args=(init_kwargs, self._requests, self._reports), name="wandb-writer", daemon=True
        )

    def start(self) -> None:
        """Fork the writer; it opens the run at once, at a lower CPU priority."""
        self._process.start()

    def log(self, metrics: dict[str, Any], env_steps: int) -> None:
        self._send(("row", metrics, env_steps))

    def log_video(self, path: Path, env_steps: int) -> None:
        self._send(("video", str(path), env_steps))

    def _send(self, request: tuple[Any, ...]) -> None:
        self._read_reports()
        if self._error is not None:
            raise TitanError(f"W&B run failed: {self._error}")
        if not self._process.is_alive():
            raise TitanError(f"the W&B writer process exited with code {self._process.exitcode}")
        self._requests.put(request)

    def _read_reports(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                kind, text = self._reports.get_nowait()
                if kind == "opened":
                    log.info("W&B run: %s", text)
                elif self._error is None:
                    self._error = text

    def close(self) -> None:
        """Finish the run: every row sent reaches it first."""
        if self._process.pid is None:
            return
        with contextlib.suppress(ValueError, OSError):
            self._requests.put(None)
        self._process.join(FINISH_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("the W&B run did not finish in %.0fs: its writer is stopped, the run may lack its last rows", FINISH_TIMEOUT_S)
            self._process.kill()
            self._process.join(5.0)
        self._read_reports()
        self._requests.close()
        self._reports.close()


def _writer_main(init_kwargs: dict[str, Any], requests: Any, reports: Any) -> None:
    """The writer process: open the run, then log every request until None."""
    from titan_rl.service import exit_with_parent_process, leave_stop_signals_to_parent

    leave_stop_signals_to_parent()  # the trainer ends it through `requests`
    exit_with_parent_process()  # a trainer that dies without a word
    os.nice(NICENESS)
    mode = init_kwargs["mode"]
    os.environ["WANDB_MODE"] = mode  # an env var, not just init(mode=...): no network attempt at all offline
    os.environ["WANDB_SILENT"] = "true"  # no banners, sparklines or sync hints: the trainer logs where the run is
    run, failed = None, False
    try:
        import wandb

        run = wandb.init(**init_kwargs)
        where = run.url if mode == "online" else f"{Path(run.dir).parent} (`wandb sync` uploads it)"
        reports.put(("opened", f"{mode}, {where}"))
    except Exception as e:
        _failed(reports, mode, "could not start", e)
        failed = True
    while (request := requests.get()) is not None:
        if failed:
            continue  # drained, so the trainer's queue never fills
        kind, payload, env_steps = request
        try:
            if kind == "video":
                run.log({"video/greedy_episode": wandb.Video(payload, format="mp4")}, step=env_steps)
            else:
                run.log(payload, step=env_steps)
        except Exception as e:
            _failed(reports, mode, "could not take a row", e)
            failed = True
    if run is not None:
        run.finish()


def _failed(reports: Any, mode: str, what: str, error: Exception) -> None:
    log.error("W&B %s run %s: %s: %s", mode, what, type(error).__name__, error)
    reports.put(("error", f"{type(error).__name__}: {error}"))
