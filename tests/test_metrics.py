"""Where metrics go: metrics.jsonl and a W&B run (offline here: no account, no network)."""

import json
import time

from tests.helpers import make_config
from titan_rl.metrics import MetricsLogger


def test_rows_logged_while_the_wandb_run_opens_reach_it_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config("logging.console=false", f"logging.run_dir={tmp_path}")
    logger = MetricsLogger(cfg, tmp_path / "run", "run")
    logger.start()  # returns before the run is open: training does not wait for it
    try:
        for step, key in enumerate(("a", "b", "c"), start=1):
            logger.log({f"charts/{key}": float(step)}, env_steps=100 * step)
        assert logger._wandb is None  # the three rows were held
        logger._wandb_opening.join(timeout=120)
        run = logger._wandb
        logger.log({"charts/d": 4.0}, env_steps=400)  # W&B commits a step once a later one arrives
        # W&B drops a row whose step is below one it has seen: each key arrives only if every row did, in order
        deadline = time.monotonic() + 30
        while run.summary.get("_step") != 300 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {k: run.summary.get(f"charts/{k}") for k in "abc"} == {"a": 1, "b": 2, "c": 3}
    finally:
        logger.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == [100, 200, 300, 400]


def test_a_wandb_run_that_cannot_open_is_logged_at_once_and_fails_the_next_row(tmp_path, monkeypatch, caplog):
    import dataclasses

    import pytest

    from titan_rl.errors import TitanError

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config("logging.console=false", f"logging.run_dir={tmp_path}")
    # past the config's own check, as a project W&B starts refusing would be
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, wandb_project="team/project"))
    logger = MetricsLogger(cfg, tmp_path / "run", "run")
    logger.start()
    try:
        logger._wandb_opening.join(timeout=120)
        assert "W&B offline run could not start" in caplog.text and "Invalid project name" in caplog.text
        with pytest.raises(TitanError, match="W&B run failed"):
            logger.log({"charts/a": 1.0}, env_steps=1)
    finally:
        logger.close()
