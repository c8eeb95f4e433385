"""Fault drills: each service as its own process, started as on separate hosts, then killed.

kill -9 leaves a process no time to save anything: what comes back is what its last periodic
snapshot or checkpoint held (both every second here), and the run must go on: the buffer and
trainer drills to a solved CartPole (a confirmed evaluation >= 475).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from titan_rl.auth import TOKEN_ENV
from titan_rl.clients.buffer import BufferClient
from titan_rl.clients.rollout import RolloutClient
from titan_rl.clients.trainer import TrainerClient
from titan_rl.launcher import free_ports
from titan_rl.v1 import buffer_pb2

pytestmark = pytest.mark.e2e

TOKEN = "drill-token"
SERVICES = {"buffer": "buffer_server", "trainer": "trainer_server", "rollout": "rollout_server"}


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


class Run:
    """One run's three services, each started with `python -m titan_rl.<service>` on its own port."""

    def __init__(self, tmp_path: Path, *overrides: str):
        self.tmp_path = tmp_path
        ports = dict(zip(SERVICES.values(), free_ports(["127.0.0.1"] * len(SERVICES)), strict=True))
        self.address = {service: f"127.0.0.1:{ports[section]}" for service, section in SERVICES.items()}
        self.overrides = [f"{section}.port={port}" for section, port in ports.items()] + [
            f"logging.run_dir={tmp_path}/runs",
            "logging.run_name=drill",
            f"logging.checkpoint_path={tmp_path}/checkpoint.pth",
            "logging.console=false",
            "logging.video=false",  # recorded and checked once, in test_end_to_end
            "durability.snapshot_interval_s=1",
            "durability.checkpoint_interval_s=1",
            "budget.target_eval_return=475",  # the bar the drills check the checkpoint against, reached sooner than 495
            *overrides,
        ]
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts = dict.fromkeys(SERVICES, 0)

    def start(self, service: str, *overrides: str, token: str = TOKEN) -> subprocess.Popen:
        """Start `service` with the run's overrides, then `overrides` (which win)."""
        self.starts[service] += 1
        log = open(self.tmp_path / f"{service}.{self.starts[service]}.log", "w")
        self.procs[service] = subprocess.Popen(
            [sys.executable, "-m", f"titan_rl.{service}", "--config", "config/cartpole.yaml", *self.overrides, *overrides],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"WANDB_MODE": "disabled", TOKEN_ENV: token, "PYTHONUNBUFFERED": "1"},
        )
        return self.procs[service]

    def log(self, service: str, start: int | None = None) -> str:
        return (self.tmp_path / f"{service}.{start or self.starts[service]}.log").read_text()

    def kill(self, service: str) -> None:
        self.procs[service].send_signal(signal.SIGKILL)
        self.procs[service].wait()

    def trainer_status(self):
        client = TrainerClient(self.address["trainer"], timeout_s=2)
        try:
            return client.status()
        except Exception:  # noqa: BLE001 - not up (yet): the drills poll
            return None
        finally:
            client.close()

    def buffer_info(self):
        client = BufferClient(self.address["buffer"], timeout_s=2)
        try:
            return client.stub.Info(buffer_pb2.InfoRequest(), timeout=2)
        except Exception:  # noqa: BLE001 - not up (yet): the drills poll
            return None
        finally:
            client.close()

    def wait_exit(self, service: str, timeout_s: float) -> int:
        try:
            return self.procs[service].wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{service} still running after {timeout_s:.0f}s:\n{self.log(service)[-3000:]}") from None

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def run_factory(tmp_path, monkeypatch) -> Iterator[Callable[..., Run]]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # this process's clients carry the services' token too
    runs: list[Run] = []

    def make(*overrides: str) -> Run:
        runs.append(Run(tmp_path, *overrides))
        return runs[-1]

    yield make
    for run in runs:
        run.close()


def eval_mean(path: Path) -> float:
    returns = torch.load(path, weights_only=True)["eval_returns"]
    return sum(returns) / len(returns)


def test_buffer_killed_restores_its_snapshot_and_the_run_still_solves(run_factory):
    # no evaluation before 15k env steps: a lucky network once solved at 4.7k, before the kill
    run = run_factory("eval.interval_env_steps=15000")
    for service in ("buffer", "trainer", "rollout"):
        run.start(service)
    snapshot = run.tmp_path / "runs" / "drill" / "buffer_snapshot.npz"
    wait_until(lambda: snapshot.exists() and (s := run.trainer_status()) and s.env_steps > 4000, 120, "4k steps")
    time.sleep(1.5)  # a snapshot after those steps
    before = run.trainer_status().env_steps
    run.kill("buffer")
    run.start("buffer")
    info = wait_until(run.buffer_info, 60, "the restarted buffer")
    assert info.size > 3000 and info.env_steps_total > 3000, "the replay came back from the snapshot"
    assert "restored" in run.log("buffer")

    # the run may solve within those 2k steps, and then the trainer is gone
    def went_on() -> bool:
        return run.procs["trainer"].poll() is not None or bool((s := run.trainer_status()) and s.env_steps > before + 2000)

    wait_until(went_on, 60, "training to go on")
    assert run.wait_exit("trainer", 240) == 0, run.log("trainer")[-3000:]
    assert "budget.target_eval_return" in run.log("trainer"), run.log("trainer")[-2000:]
    assert int(re.search(r"done \(.*\): (\d+) env steps", run.log("trainer"))[1]) > before
    # the trainer ended the run: the others stop by themselves, with exit 0
    assert run.wait_exit("buffer", 30) == 0 and run.wait_exit("rollout", 30) == 0
    assert eval_mean(run.tmp_path / "checkpoint.pth") >= 475


def test_trainer_killed_resumes_its_counters_the_actors_take_its_weights_and_the_best_checkpoint_never_worsens(run_factory):
    # the first trainer never ends the run (a lucky network once confirmed 495.6 at its first evaluation,
    # 3.2k env steps, before the kill); the restarted one stops at the drills' bar
    run = run_factory("budget.target_eval_return=null")
    for service in ("buffer", "trainer", "rollout"):
        run.start(service)
    last = run.tmp_path / "checkpoint_last.pth"
    # ~4k env steps at the config's 0.25 updates per env step, where the drill killed it at 0.5
    status = wait_until(lambda: (s := run.trainer_status()) and s.updates > 750 and last.exists() and s, 180, "750 updates")
    time.sleep(1.5)
    saved = torch.load(last, weights_only=True)["counters"]
    best = eval_mean(run.tmp_path / "checkpoint.pth") if (run.tmp_path / "checkpoint.pth").exists() else None
    run.kill("trainer")
    acting = RolloutClient(run.address["rollout"]).stats().policy_version
    run.start("trainer", "budget.target_eval_return=475")  # as Kubernetes restarts it: the same run name, so it resumes
    resumed = wait_until(run.trainer_status, 60, "the restarted trainer")
    assert resumed.updates >= saved["updates"] > 0 and resumed.env_steps >= saved["env_steps"] >= status.env_steps - 5000
    assert resumed.policy_version > saved["policy_version"], "versions go on from the checkpoint's"
    assert "resuming run drill" in run.log("trainer")
    wait_until(
        lambda: (s := RolloutClient(run.address["rollout"]).stats()) and s.policy_version > max(acting, saved["policy_version"]),
        30,
        "the actors to act with the new trainer's weights",
    )
    assert run.wait_exit("trainer", 240) == 0, run.log("trainer")[-3000:]
    final = eval_mean(run.tmp_path / "checkpoint.pth")
    assert final >= 475 and (best is None or final >= best)


def test_a_killed_rollout_worker_is_restarted(run_factory):
    run = run_factory("budget.target_eval_return=null", "budget.max_env_steps=1000000")
    for service in ("buffer", "trainer", "rollout"):
        run.start(service)
    wait_until(lambda: (s := run.trainer_status()) and s.env_steps > 2000, 120, "collection")

    def children(pid: int) -> list[int]:
        return [int(child) for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]

    # the workers, forked from the service itself (beside multiprocessing's resource tracker)
    rollout = run.procs["rollout"].pid
    command = Path(f"/proc/{rollout}/cmdline").read_bytes()
    workers = [pid for pid in children(rollout) if Path(f"/proc/{pid}/cmdline").read_bytes() == command]
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: "restarting" in run.log("rollout"), 20, "the pool to notice")

    # its replacement comes from a forkserver, not a fork of the service, whose gRPC is live by now
    def forkservers() -> list[int]:
        return [pid for pid in children(rollout) if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    wait_until(lambda: len(found := forkservers()) == 1 and len(children(found[0])) == 1, 30, "a replacement forked from a forkserver")
    steps = run.trainer_status().env_steps
    wait_until(lambda: run.trainer_status().env_steps > steps + 2000, 60, "collection to go on")


def test_a_replica_whose_records_the_buffer_refuses_stops_instead_of_restarting_its_workers_for_ever(run_factory):
    """A rollout replica started on its own with an algorithm whose records are not the buffer's (here
    a field the buffer's table lacks): every chunk is refused as INVALID_ARGUMENT. Its workers used
    to be started again every 2 s for as long as the run lasted; now the pool sees the crash loop."""
    run = run_factory("budget.target_eval_return=null", "algorithm.path=tests.plugins.WritesAnUndeclaredField")
    run.start("buffer")
    run.start("trainer")
    run.start("rollout")
    assert run.wait_exit("rollout", 90) != 0
    log = run.log("rollout")
    assert "rejected a chunk: INVALID_ARGUMENT: chunk.records.value: is not in the table's signature" in log, log[-3000:]
    assert "another start would fail the same way" in log, log[-3000:]


def test_a_replica_with_a_token_the_trainer_refuses_stops_naming_the_refusal(run_factory):
    """A rollout replica started with another run's token: the trainer refuses its policy stream as
    UNAUTHENTICATED, and its workers used to wait for weights, retrying, for as long as it lived."""
    run = run_factory()
    run.start("buffer")
    run.start("trainer")
    run.start("rollout", token="another-runs-token")
    assert run.wait_exit("rollout", 90) != 0
    log = run.log("rollout")
    assert "refused the policy stream: UNAUTHENTICATED" in log and "cannot run with this config" in log, log[-3000:]


def test_services_started_with_different_values_of_keys_they_share_refuse_each_other_naming_the_keys(run_factory):
    """Each host's YAML, edited apart: a replica with 1-step returns and CartPole-v0 (episodes cut at
    200 steps), and a trainer of another run name, all ran and learned from records that did not
    mean what the learner took them for, or from another run's replay; nothing said so."""
    run = run_factory("budget.target_eval_return=null", "logging.run_name=one")
    run.start("buffer")
    run.start("trainer", "logging.run_name=another")
    assert run.wait_exit("trainer", 90) != 0
    shared = "were started with different values of keys both read: "
    assert f"FAILED_PRECONDITION: /titan_rl.v1.BufferService/SampleStream: this buffer and the calling trainer {shared}" in (
        trainer := run.log("trainer")
    ), trainer[-3000:]
    assert 'logging.run_name is "another" at the trainer, "one" at this buffer' in trainer
    run.start("trainer")  # of the buffer's run, so that the replica's refusal is the trainer's
    run.start("rollout", "algorithm.config.n_step=1", "rollout_server.env_name=CartPole-v0")
    assert run.wait_exit("rollout", 90) != 0
    rollout = run.log("rollout")
    refusal = "refused the policy stream: FAILED_PRECONDITION: /titan_rl.v1.TrainerService/WatchPolicy: this trainer and the calling"
    assert f"{refusal} rollout {shared}" in rollout
    assert 'rollout_server.env_name is "CartPole-v0" at the rollout, "CartPole-v1" at this trainer' in rollout
    assert "algorithm.config.n_step is 1 at the rollout, 3 at this trainer" in rollout, rollout[-3000:]
    assert "cannot run with this config" in rollout


def test_a_trainer_that_never_gets_a_batch_says_why_and_fails_instead_of_keeping_an_untrained_policy(run_factory, tmp_path):
    """No rollout replica (never started, or pointed elsewhere): the trainer used to wait out
    budget.max_wall_s (900 s) saying only that the buffer held batches back, then exit 0 with the
    untrained network scored and kept as the run's best checkpoint."""
    run = run_factory("budget.max_wall_s=12")
    run.start("buffer")
    run.start("trainer")
    assert run.wait_exit("trainer", 90) == 1
    log = run.log("trainer")
    assert "no batch yet after 10s: no rollout replica has sent a record to the buffer at 127.0.0.1:" in log, log[-3000:]
    assert "error: no batch came from the buffer before budget.max_wall_s=12 reached: no rollout replica has sent" in log
    assert not (tmp_path / "checkpoint.pth").exists() and (tmp_path / "checkpoint_last.pth").exists()
    assert run.wait_exit("buffer", 30) == 0  # told that the run ended


POOL_OF_FAILING_WORKERS = """
import sys, time
from tests.helpers import make_config
from titan_rl.rollout import service
from titan_rl.rollout.stats import TrajectoryStats

service.QUICK_EXIT_S = 3.0  # scaled down with the pool: 31 workers at the real 60 s
cfg = make_config("algorithm.path=tests.plugins.CannotBeBuilt", "rollout_server.num_workers=4")
pool = service.WorkerPool(cfg, TrajectoryStats(4))
pool.start()
sys.exit(0 if pool.failed.wait(60) else 1)
"""


def test_a_pool_whose_workers_all_fail_at_start_gives_up_however_many_there_are():
    """Each dead worker was judged quick or not by its age when the supervisor got to it, after
    sleeping out the restart delay of every worker before it: with 4 workers dying at once and
    3 s to count as quick, the third and fourth never did, and the pool restarted them for ever
    (at the real 60 s, from 31 workers on)."""
    done = subprocess.run([sys.executable, "-c", POOL_OF_FAILING_WORKERS], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "another start would fail the same way" in done.stderr and "a bug in this algorithm's constructor" in done.stderr


def test_services_started_in_any_order_find_each_other(run_factory):
    """Finding each other is the point, not solving (the other drills solve): a short run that
    learns from the actors' data through the buffer and ends every service."""
    run = run_factory("budget.max_env_steps=6000", "budget.target_eval_return=null")
    for service in ("rollout", "trainer", "buffer"):  # each waits for the peers it needs
        run.start(service)
        time.sleep(2)
    assert run.wait_exit("trainer", 240) == 0, run.log("trainer")[-3000:]
    assert run.wait_exit("buffer", 30) == 0, run.log("buffer")[-3000:]
    assert run.wait_exit("rollout", 30) == 0, run.log("rollout")[-3000:]
    summary = json.loads((run.tmp_path / "runs" / "drill" / "summary.json").read_text())
    assert summary["env_steps"] >= 6000 and summary["updates"] > 500, summary


@pytest.mark.parametrize("service, peer", [("rollout", "trainer"), ("trainer", "buffer"), ("buffer", "learner")])
def test_a_service_whose_peer_stays_gone_exits_non_zero_naming_it(run_factory, service, peer):
    run = run_factory("durability.peer_timeout_s=3")
    proc = run.start(service)
    code = run.wait_exit(service, 60)
    assert code != 0 and peer in run.log(service), run.log(service)[-2000:]
    assert proc.returncode == code


def test_a_peer_that_does_not_answer_is_logged_while_it_is_retried(caplog, monkeypatch):
    """A learner dialling a wrong buffer address waited in silence until durability.peer_timeout_s."""
    from titan_rl import rpc
    from titan_rl.clients.buffer import BatchPrefetcher

    monkeypatch.setattr(rpc, "READY_WARN_S", 0.2)
    address = f"127.0.0.1:{free_ports(['127.0.0.1'])[0]}"  # nothing listens there
    batches = BatchPrefetcher(address, 32, 1, 1, "default", peer_timeout_s=60)
    try:
        deadline = time.monotonic() + 20
        while "still trying" not in caplog.text and time.monotonic() < deadline:
            assert batches.next(timeout_s=0.1) is None
    finally:
        batches.close()
    assert re.search(rf"buffer {address} unreachable for \d+s, still trying; giving up at 60s", caplog.text), caplog.text


def test_a_peer_back_after_six_seconds_down_is_reached_within_two():
    """gRPC's default reconnect back-off (1 s growing to 120 s) reached a peer that came back after
    6 s down 2.6-3.2 s later; every peer's restart waited it out."""
    from titan_rl import rpc

    port = free_ports(["127.0.0.1"])[0]
    channel = rpc.make_channel(f"127.0.0.1:{port}")
    down_s = 6.0
    started: dict[str, float] = {}
    server = None

    def come_back() -> None:
        nonlocal server
        time.sleep(down_s)
        server, _, _ = rpc.make_server("127.0.0.1", port)
        server.start()
        started["at"] = time.monotonic()

    thread = threading.Thread(target=come_back)
    thread.start()
    try:
        assert rpc.wait_until_ready(channel, time.monotonic(), 30, threading.Event(), "peer")
        reached = time.monotonic()
    finally:
        thread.join()
        channel.close()
        if server is not None:
            server.stop(0)
    waited_s = reached - started["at"]
    assert waited_s < 2.0, f"reached {waited_s:.1f}s after it came back"
