"""Where metrics go: metrics.jsonl and a W&B run (offline here: no account, no network)."""

import dataclasses
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import make_config
from titan_rl.errors import TitanError
from titan_rl.metrics import MetricsLogger

LEVELDB_BLOCK_BYTES = 32768
WANDB_FILE_HEADER_BYTES = 7  # ":W&B", a 2-byte magic number, a version byte


def wandb_records(path: Path) -> Iterator[bytes]:
    """The protobuf records of an offline W&B run file (`run-<id>.wandb`), which wandb writes in
    LevelDB's log format: 32 KiB blocks of chunks, each a 7-byte header (CRC, length, type: full,
    first, middle or last piece of a record) and its bytes."""
    data, pos, pending = path.read_bytes(), WANDB_FILE_HEADER_BYTES, b""
    while pos + 7 <= len(data):
        left = LEVELDB_BLOCK_BYTES - pos % LEVELDB_BLOCK_BYTES
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            yield pending


def wandb_run_records(run_dir: Path) -> Iterator:
    """The records (`wandb_internal_pb2.Record`) of the one offline W&B run under `run_dir`."""
    from wandb.proto import wandb_internal_pb2

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    for data in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        yield record


def wandb_history(run_dir: Path) -> list[dict]:
    """Every row the offline W&B run under `run_dir` holds: {"_step": step, key: value}, in order."""
    rows = []
    for record in wandb_run_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            rows.append({**row, "_step": record.history.step.num})
    return rows


def test_rows_logged_while_the_wandb_run_opens_reach_it_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_config("logging.console=false", f"logging.run_dir={tmp_path}")
    logger = MetricsLogger(cfg, tmp_path / "run", "run")  # the writer opens the run from here on
    logger.start()
    try:
        for step, key in enumerate(("a", "b", "c", "d"), start=1):  # sent at once: the learner never waits for W&B
            logger.log({f"charts/{key}": float(step)}, env_steps=100 * step)
    finally:
        logger.close()  # every row sent reaches the run before it finishes
    history = [{k: v for k, v in row.items() if k.startswith("charts/") or k == "_step"} for row in wandb_history(tmp_path / "run")]
    assert history == [{"_step": 100 * step, f"charts/{key}": step} for step, key in enumerate("abcd", start=1)]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == [100, 200, 300, 400]


def test_a_wandb_run_that_cannot_open_fails_the_next_row(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_config("logging.console=false", f"logging.run_dir={tmp_path}")
    # past the config's own check, as a project W&B starts refusing would be
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, wandb_project="team/project"))
    logger = MetricsLogger(cfg, tmp_path / "run", "run")
    try:
        deadline = time.monotonic() + 120
        with pytest.raises(TitanError, match="W&B run failed: .*Invalid project name"):  # noqa: PT012
            while time.monotonic() < deadline:
                logger.log({"charts/a": 1.0}, env_steps=1)
                time.sleep(0.1)
    finally:
        logger.close()


def test_the_trainer_process_never_imports_wandb(tmp_path):
    """W&B's imports and run run in the writer's process: on a thread of the trainer they held the GIL
    the learner needs, and the first update of an offline run came ~0.7 s later than without W&B."""
    script = textwrap.dedent(
        f"""
        import sys
        from tests.helpers import make_config
        from titan_rl.metrics import MetricsLogger

        logger = MetricsLogger(make_config("logging.console=false"), __import__("pathlib").Path({str(tmp_path)!r}) / "run", "run")
        logger.start()
        logger.log({{"charts/a": 1.0}}, env_steps=1)
        logger.close()
        print("wandb imported" if "wandb" in sys.modules else "wandb not imported")
        """
    )
    env = {**os.environ, "WANDB_MODE": "offline"}
    repo = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "wandb not imported"
    assert [row["charts/a"] for row in wandb_history(tmp_path / "run")] == [1.0]


def test_a_writer_killed_by_a_signal_ends_wandb_logging_not_the_run(tmp_path, monkeypatch, caplog):
    """A SIGTERM to the trainer's whole process group as it stops, or an out-of-memory kill, took the
    writer; the trainer's next row raised and the run ended without its last checkpoint."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = MetricsLogger(make_config("logging.console=false"), tmp_path / "run", "run")
    try:
        os.kill(logger._wandb._process.pid, signal.SIGKILL)
        logger._wandb._process.join(10)
        logger.log({"charts/a": 1.0}, env_steps=1)
        logger.log({"charts/b": 2.0}, env_steps=2)
        assert "W&B writer was killed by signal 9" in caplog.text
    finally:
        logger.close()
    assert [json.loads(line)["env_steps"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_writer_that_never_finishes_does_not_hold_the_trainer_at_exit(tmp_path):
    """A run stuck past the finish timeout with more rows unread than a pipe holds: the writer is
    killed, and the trainer exits rather than waiting for good to hand the rows over."""
    script = textwrap.dedent(
        f"""
        import os, signal
        import titan_rl.wandb_writer as w

        w.FINISH_TIMEOUT_S = 1.0
        writer = w.WandbWriter({{"mode": "offline", "dir": {str(tmp_path)!r}}})
        writer.start()
        os.kill(writer._process.pid, signal.SIGSTOP)  # a writer that reads nothing more
        for step in range(200):  # ~200 KB: over the 64 KB a pipe holds
            writer.log({{f"charts/key_{{k}}": float(k) for k in range(40)}}, step)
        writer.close()
        print("closed")
        """
    )
    repo = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "closed" and "did not finish in 1s" in out.stderr


def test_a_trainer_that_fails_to_start_finishes_its_wandb_run(tmp_path):
    """The port taken: the trainer exits with the error, and the W&B run it had opened is finished,
    not left half-written by exit terminating its writer."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "titan_rl.trainer", "--port", str(port), f"logging.run_dir={tmp_path}", "logging.run_name=taken",
             f"logging.checkpoint_path={tmp_path}/ck.pth"],
            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120,
            env={**os.environ, "WANDB_MODE": "offline"},
        )  # fmt: skip
    assert result.returncode != 0, result.stderr
    kinds = {record.WhichOneof("record_type") for record in wandb_run_records(tmp_path / "taken")}
    assert "exit" in kinds, kinds
