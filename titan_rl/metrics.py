"""Where training metrics go: W&B (offline unless told otherwise), metrics.jsonl, and the console."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from titan_rl.config import Config, config_to_dict

log = logging.getLogger(__name__)

PLAIN_LINE_EVERY_S = 5.0


def wandb_run_id(run_name: str) -> str:
    """A W&B run id from the run name: its letters, digits, '-' and '_' (W&B refuses others), at most 64."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]


def wandb_mode(cfg: Config) -> str:
    """WANDB_MODE from the environment wins (tests set `disabled`); otherwise the config's mode."""
    return os.environ.get("WANDB_MODE") or cfg.logging.wandb_mode


class ConsoleProgress:
    """A live progress bar on a terminal; a plain line every few seconds when output is a file or pipe."""

    def __init__(self, total_env_steps: int, enabled: bool):
        self.console = Console(stderr=False)
        self.live = enabled and self.console.is_terminal
        self.enabled = enabled
        self._next_plain = 0.0
        self._progress = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed:>7.0f}/{task.total:.0f} env steps"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[line]}"),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_env_steps, line="waiting for data")
            # log records print above the live bar instead of breaking it
            logging.getLogger().handlers = [RichHandler(console=self.console, show_path=False, log_time_format="%H:%M:%S")]
            self._progress.start()

    def update(self, env_steps: int, line: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=env_steps, line=line)
        elif self.enabled and (now := time.monotonic()) >= self._next_plain:
            print(f"env_steps={env_steps} {line}", flush=True)
            self._next_plain = now + PLAIN_LINE_EVERY_S

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


class MetricsLogger:
    """`log(metrics, env_steps)` writes one jsonl row, one W&B step and refreshes the console line."""

    def __init__(self, cfg: Config, run_dir: Path, run_name: str):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.cfg, self.run_name = cfg, run_name
        self.progress: ConsoleProgress | None = None
        self._wandb = None

    def start(self) -> None:
        """Open the W&B run (about a second), then the console view.

        Called once the trainer serves, so the actors start collecting meanwhile.
        """
        mode = wandb_mode(self.cfg)
        if mode != "disabled":
            os.environ["WANDB_MODE"] = mode  # an env var, not just init(mode=...): no network attempt at all offline
            import wandb

            self._wandb = wandb.init(
                project=self.cfg.logging.wandb_project,
                name=self.run_name,
                id=wandb_run_id(self.run_name),  # a resumed run logs on to the same W&B run
                resume="allow",
                dir=str(self.run_dir),
                config=config_to_dict(self.cfg),
                mode=mode,
            )
            log.info("W&B %s run in %s", mode, self._wandb.dir)
        self.progress = ConsoleProgress(self.cfg.budget.max_env_steps, self.cfg.logging.console)

    def log(self, metrics: dict[str, Any], env_steps: int) -> None:
        self._jsonl.write(json.dumps({"env_steps": env_steps, **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=env_steps)

    def console(self, env_steps: int, line: str) -> None:
        if self.progress is not None:
            self.progress.update(env_steps, line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
