"""Where training metrics go: W&B (offline unless told otherwise), metrics.jsonl, TensorBoard (when switched on), the console."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from titan_rl.config import Config, shareable_config_dict
from titan_rl.wandb_writer import WandbWriter

log = logging.getLogger(__name__)

PLAIN_LINE_EVERY_S = 5.0


def wandb_run_id(run_name: str) -> str:
    """A W&B run id from the run name: its letters, digits, '-' and '_' (W&B refuses others), at most 64."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]


def wandb_mode(cfg: Config) -> str:
    """WANDB_MODE from the environment wins (tests set `disabled`); otherwise the config's mode."""
    return os.environ.get("WANDB_MODE") or cfg.logging.wandb_mode


def eta_s(env_steps_done: int, env_steps_total: int, elapsed_s: float, start_env_steps: int = 0) -> float | None:
    """Seconds left to `env_steps_total` at the mean rate since `start_env_steps`; None before any progress."""
    done = env_steps_done - start_env_steps
    if done <= 0 or elapsed_s <= 0:
        return None
    return max(env_steps_total - env_steps_done, 0) * elapsed_s / done


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ConsoleProgress:
    """A live progress bar on a terminal; a plain line every few seconds when output is a file or pipe.
    Both show env steps against the budget, its percentage and the time left at the rate so far
    (a run that reaches its target return stops sooner)."""

    def __init__(self, total_env_steps: int, enabled: bool):
        self.console = Console(stderr=False)
        self.live = enabled and self.console.is_terminal
        self.enabled = enabled
        self.total_env_steps = total_env_steps
        self._next_plain = 0.0
        self._started = time.monotonic()
        self._start_env_steps: int | None = None  # a resumed run starts counting where it left off
        self._progress = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed:>7.0f}/{task.total:.0f} env steps {task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                TextColumn("{task.fields[line]}"),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_env_steps, line="waiting for data", eta="-:--")
            # log records print above the live bar instead of breaking it
            logging.getLogger().handlers = [RichHandler(console=self.console, show_path=False, log_time_format="%H:%M:%S")]
            self._progress.start()

    def update(self, env_steps: int, line: str) -> None:
        now = time.monotonic()
        if self._start_env_steps is None:
            self._start_env_steps, self._started = env_steps, now
        eta = format_duration(eta_s(env_steps, self.total_env_steps, now - self._started, self._start_env_steps))
        if self._progress is not None:
            self._progress.update(self._task, completed=env_steps, line=line, eta=eta)
        elif self.enabled and now >= self._next_plain:
            percent = 100 * env_steps / self.total_env_steps
            print(f"{env_steps:,}/{self.total_env_steps:,} env steps ({percent:.0f}%, ETA {eta}) | {line}", flush=True)
            self._next_plain = now + PLAIN_LINE_EVERY_S

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


class MetricsLogger:
    """`log(metrics, env_steps)` writes one jsonl row, one W&B step and refreshes the console line.

    The W&B run's writer process (`titan_rl.wandb_writer`) starts here, by `wandb_start_method`,
    and opens the run while the caller goes on: the trainer builds this before it has any thread
    or gRPC, and forks it.
    """

    def __init__(self, cfg: Config, run_dir: Path, run_name: str, wandb_start_method: str = "spawn"):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        # the config this run trains with, every default and override resolved (the token left out)
        config = shareable_config_dict(cfg)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.cfg, self.run_name = cfg, run_name
        self.progress: ConsoleProgress | None = None
        self._wandb: WandbWriter | None = None
        if (mode := wandb_mode(cfg)) != "disabled":
            self._wandb = WandbWriter(
                {
                    "project": cfg.logging.wandb_project,
                    "name": run_name,
                    "id": wandb_run_id(run_name),  # a resumed run logs on to the same W&B run
                    "resume": "allow",
                    "dir": str(run_dir),
                    "config": config,
                    "mode": mode,
                },
                wandb_start_method,
            )
            self._wandb.start()
        self._tensorboard = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def start(self) -> None:
        """Show progress on the console."""
        self.progress = ConsoleProgress(self.cfg.budget.max_env_steps, self.cfg.logging.console)

    def log(self, metrics: dict[str, Any], env_steps: int) -> None:
        self._jsonl.write(json.dumps({"env_steps": env_steps, **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, env_steps)
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, value, env_steps)

    def log_video(self, path: Path, env_steps: int) -> None:
        """A video file of the agent, to W&B (the file itself stays in the run folder)."""
        if self._wandb is not None:
            self._wandb.log_video(path, env_steps)

    def console(self, env_steps: int, line: str) -> None:
        if self._wandb is not None:  # where the run is, or why it failed, while the trainer waits for data too
            self._wandb.read_reports()
        if self.progress is not None:
            self.progress.update(env_steps, line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.close()
