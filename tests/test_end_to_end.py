"""All three services as processes, started the way `bash run.sh` starts them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import REPO
from titan_rl.auth import TOKEN_ENV
from titan_rl.checkpoint import load_checkpoint
from titan_rl.clients.buffer import BufferClient
from titan_rl.clients.rollout import RolloutClient
from titan_rl.clients.trainer import TrainerClient
from titan_rl.config import config_from_dict
from titan_rl.launcher import free_port, free_ports
from titan_rl.v1 import buffer_pb2, rollout_pb2

pytestmark = pytest.mark.e2e

TOKEN = "e2e-token"
"""The launcher hands its services the token in its environment; clients in this process send it too."""
NEVER_ENDS = ("budget.max_env_steps=10000000", "budget.target_eval_return=null")


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running, or a zombie its living parent has not reaped (a zombie whose parent is gone waits
    for init, whose job that is)."""
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return False
    return state != "Z" or (int(ppid) != 1 and alive(int(ppid)))


def wait_serving(proc: subprocess.Popen, port: int, timeout_s: float = 60) -> None:
    """Until the service `proc` started on `port` answers health checks (or `timeout_s` passes);
    fails with its output if it exits first."""
    from titan_rl.rpc import is_serving

    deadline = time.monotonic() + timeout_s
    while not is_serving(f"127.0.0.1:{port}") and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        time.sleep(0.2)


def left_alive(pids: set[int], timeout_s: float = 20) -> list[int]:
    """Those of `pids` still alive after waiting up to `timeout_s` for all of them to end."""
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [pid for pid in pids if alive(pid)]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def maps_torch(pid: int) -> bool:
    """Whether process `pid` has torch's C++ library loaded."""
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def launch(
    tmp_path: Path,
    *overrides: str,
    config: str = "config/cartpole.yaml",
    token: str | None = TOKEN,
    new_session: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, dict[str, str]]:
    """The launcher as `bash run.sh` runs it; with `token` None, none in its environment (it makes its own);
    with `new_session`, in a process group of its own, as a shell job is; `env` is added to its environment."""
    argv, addresses = launch_argv(tmp_path, overrides, config)
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=launch_env(token, env),
        start_new_session=new_session,
    )
    return proc, addresses


def launch_argv(tmp_path: Path, overrides: tuple[str, ...], config: str = "config/cartpole.yaml") -> tuple[list[str], dict[str, str]]:
    """The launcher's command line, with free ports and files under `tmp_path`, and each service's address."""
    sections = ("buffer_server", "rollout_server", "trainer_server")
    ports = dict(zip(sections, free_ports(["127.0.0.1"] * len(sections)), strict=True))
    args = [f"{name}.port={port}" for name, port in ports.items()]
    args += [f"logging.run_dir={tmp_path}/runs", "logging.run_name=test", f"logging.checkpoint_path={tmp_path}/checkpoint.pth"]
    args += ["logging.console=true", "logging.video=false", *overrides]  # the video: recorded and checked once, below
    return [sys.executable, "-m", "titan_rl.launch", "--config", config, *args], {name: f"127.0.0.1:{port}" for name, port in ports.items()}


def launch_env(token: str | None = TOKEN, env: dict[str, str] | None = None) -> dict[str, str]:
    return (
        {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        | {"WANDB_MODE": "disabled"}
        | ({TOKEN_ENV: token} if token else {})
        | (env or {})
    )


class Terminal:
    """`argv` run in a terminal of its own (a pseudo-terminal it controls, as a login shell's job),
    read through `until`; `hang_up` closes the terminal, as a dropped ssh session does."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path = REPO):
        self.master, slave = os.openpty()
        # a new session whose controlling terminal the pty is (os.login_tty), then exec: the process is the pty's foreground job
        start = "import os, sys; os.login_tty(0); os.execvp(sys.argv[1], sys.argv[1:])"
        self.proc = subprocess.Popen([sys.executable, "-c", start, *argv], cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        self.output = b""

    def until(self, text: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while text.encode() not in self.output and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.5)[0]:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:  # EIO: every process holding the terminal has closed it
                    break
        assert text.encode() in self.output, f"{text!r} never printed:\n{self.output.decode(errors='replace')}"

    def hang_up(self) -> None:
        os.close(self.master)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            os.close(self.master)


def visualize_mean_return(checkpoint: Path, episodes: int) -> float:
    """`visualize.py --no-render` on a checkpoint, as a user runs it; its last line's mean return."""
    played = subprocess.run(
        [sys.executable, "visualize.py", "--model_path", str(checkpoint), "--episodes", str(episodes), "--no-render"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert played.returncode == 0, played.stderr
    return float(played.stdout.strip().splitlines()[-1].split()[0].removeprefix("mean_return="))


def wait_for_line(proc: subprocess.Popen, text: str, timeout_s: float = 120) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never printed:\n{''.join(lines)}")


def test_three_services_learn_cartpole_and_the_checkpoint_plays_it(tmp_path, monkeypatch):
    """The shipped config, stopped at the solve bar (475) rather than its 495, which takes about twice as long.
    The kept checkpoint, confirmed >= 475 on 40 episodes, is then re-scored on 20 fresh ones: 450 leaves
    room for one short episode among them (CartPole's greedy returns are mostly 500, now and then far less)."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    proc, addresses = launch(
        tmp_path,
        "--seed",
        "1",
        "budget.max_env_steps=100000",
        "budget.target_eval_return=475",
        "logging.tensorboard=true",
        "logging.video=true",
    )
    try:
        wait_for_line(proc, "services up")
        rollout, buffer, trainer = (
            RolloutClient(addresses["rollout_server"]),
            BufferClient(addresses["buffer_server"]),
            TrainerClient(addresses["trainer_server"]),
        )
        seen = {"episodes": 0, "version": -1, "updates": 0, "stored": 0}
        while proc.poll() is None:
            stats = rollout.stats()
            if stats is not None:
                seen["episodes"] = max(seen["episodes"], stats.episodes)
                seen["version"] = max(seen["version"], stats.policy_version)
            try:  # the buffer's stub, not BufferClient.info, which retries a gone buffer for a minute
                seen["updates"] = max(seen["updates"], trainer.status().updates)
                seen["stored"] = max(seen["stored"], buffer.stub.Info(buffer_pb2.InfoRequest(), timeout=1).size)
            except Exception:  # the run may end between two polls
                pass
            time.sleep(0.5)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert seen["episodes"] > 0 and seen["version"] > 0 and seen["updates"] > 0 and seen["stored"] >= 1000, seen
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert summary["best_eval_return"] >= 475 and summary["stop_reason"].startswith("eval return"), summary
    kept, last = load_checkpoint(tmp_path / "checkpoint.pth"), load_checkpoint(tmp_path / "checkpoint_last.pth")
    # the run ends at the weights that reached the target, not where the learner took them while they were scored
    assert last["counters"]["env_steps"] == kept["counters"]["env_steps"] <= summary["env_steps"]
    assert last["counters"]["updates"] == kept["counters"]["updates"] <= summary["updates"]
    assert kept["policy"].keys() == last["policy"].keys() and all(torch.equal(last["policy"][k], v) for k, v in kept["policy"].items())
    evals = [json.loads(line) for line in (tmp_path / "runs" / "test" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/mean_return" in row for row in evals) and any("losses/td_loss" in row for row in evals)
    assert any(row.get("replicas/0/episodes", 0) > 0 for row in evals), "the actors' episodes reach the trainer through the buffer"
    assert_run_folder_holds_config_tensorboard_and_video(tmp_path / "runs" / "test")

    assert visualize_mean_return(tmp_path / "checkpoint.pth", episodes=20) >= 450


def assert_run_folder_holds_config_tensorboard_and_video(run_dir: Path) -> None:
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config_from_dict(saved).logging.run_name == "test", "the resolved config, overrides included, reads back"
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "logging.tensorboard=true writes TensorBoard events"
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    assert "charts/episodic_return" in accumulator.Tags()["scalars"]
    with imageio.get_reader(run_dir / "video.mp4", format="FFMPEG") as reader:
        assert reader.get_data(0).shape == (400, 600, 3) and reader.count_frames() >= 100


@pytest.mark.parametrize(
    ("config", "budget_env_steps", "eval_every_env_steps", "loss_key"),
    [
        ("config/cartpole_rainbow.yaml", 60_000, 1000, "losses/td_loss"),
        ("config/cartpole_qrdqn.yaml", 60_000, 1000, "losses/td_loss"),
        ("config/cartpole_impala.yaml", 600_000, 10_000, "losses/policy_loss"),
    ],
)
def test_every_shipped_algorithm_learns_through_the_three_services(tmp_path, config, budget_env_steps, eval_every_env_steps, loss_key):
    """A quicker bar than the full solve (300 rather than 475, see docs/benchmarks.md for full runs), so the suite is not flaky;
    evaluated more often than the configs do (IMPALA's actors step ~10x faster), so a run stops soon after it crosses the bar."""
    budget = (f"budget.max_env_steps={budget_env_steps}", "budget.target_eval_return=300")
    overrides = (*budget, f"eval.interval_env_steps={eval_every_env_steps}")
    proc, _ = launch(tmp_path, "--seed", "1", *overrides, config=config)
    try:
        output = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert summary["best_eval_return"] >= 300, summary
    rows = [json.loads(line) for line in (tmp_path / "runs" / "test" / "metrics.jsonl").read_text().splitlines()]
    assert any(loss_key in row for row in rows)
    assert visualize_mean_return(tmp_path / "checkpoint.pth", episodes=5) >= 150


def test_a_chunk_that_never_fills_is_still_sent_after_chunk_max_delay_s(tmp_path):
    """Chunks far larger than the run: only the delay bound gets transitions to the learner."""
    proc, _ = launch(
        tmp_path, "rollout_server.vector_steps_per_chunk=10000000", "rollout_server.chunk_max_delay_s=0.05", "budget.max_env_steps=3000"
    )
    try:
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert summary["env_steps"] >= 3000 and summary["updates"] > 0, summary


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, "SIGTERM to the group"])
def test_ctrl_c_or_sigterm_stops_every_process_and_keeps_the_checkpoint_and_the_snapshot(tmp_path, stop_signal):
    """SIGTERM is sent to the launcher's whole process group, as `kill -TERM -PGID` and `timeout` do
    (which covers a SIGTERM to the launcher alone): only the launcher gets it, and it stops the
    services in order."""
    to_group = stop_signal == "SIGTERM to the group"
    never_ends = ("budget.max_env_steps=10000000", "budget.target_eval_return=null")
    proc, _ = launch(tmp_path, *never_ends, new_session=to_group)
    try:
        wait_for_line(proc, "services up")
        time.sleep(3)  # let it train a little
        tree = descendants(proc.pid)
        assert len(tree) >= 5, tree  # buffer, trainer, rollout and its two workers (plus helpers)
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(stop_signal)
        proc.wait(timeout=60)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in tree if alive(p)], f"left behind: {[p for p in tree if alive(p)]}\n{output}"
    assert "stopped by a signal" in output and "Traceback" not in output, output
    assert proc.returncode == 0
    assert (tmp_path / "checkpoint_last.pth").exists() and (tmp_path / "runs" / "test" / "buffer_snapshot.npz").exists()


def test_rollout_workers_that_fail_at_every_start_end_the_run_with_an_error(tmp_path):
    """An actor that raises once training has started (which preflight, acting with the untrained
    network, cannot see): the workers were started again every 2 s until the wall-clock budget, and
    the run then ended with exit 0 and a kept checkpoint. Now the rollout service gives up after
    five quick exits in a row, and the launcher stops the run and exits 1."""
    proc, _ = launch(tmp_path, "algorithm.path=tests.plugins.FailsOnceTraining", *NEVER_ENDS)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 1, output
    assert "rollout died" in output and "the run stopped because rollout died" in output, output
    log = (tmp_path / "runs" / "test" / "rollout.log").read_text()
    assert "a bug in this actor" in log and "another start would fail the same way" in log, log[-3000:]


def test_run_sh_resume_continues_the_last_run_with_its_learner_counters_and_replay(tmp_path):
    proc, _ = launch(tmp_path, "budget.max_env_steps=4000", "budget.target_eval_return=null")
    first_output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, first_output
    first = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    metrics = tmp_path / "runs" / "test" / "metrics.jsonl"
    first_rows = len(metrics.read_text().splitlines())
    # a row right after the first update (launch to learning, as benchmarks/solve_time reads it), before any rate:
    # the first row came a log interval (1 s) after the first batch
    first_row = json.loads(metrics.read_text().splitlines()[0])
    assert first_row["charts/updates"] == 1 and "charts/updates_per_s" not in first_row, first_row
    restored = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)["counters"]

    # long enough to log a rate: those come once the resumed trainer has learned for a log interval (1 s)
    proc, _ = launch(tmp_path, "--resume", "budget.max_env_steps=16000", "budget.target_eval_return=null")
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, output
    rated = next(row for line in metrics.read_text().splitlines()[first_rows:] if "charts/updates_per_s" in (row := json.loads(line)))
    # the first rates cover at least one log interval (1 s) of this start's own updates and env steps: they once
    # counted the restored ones as this start's, over the seconds since the trainer started
    assert rated["charts/updates_per_s"] <= rated["charts/updates"] - restored["updates"], rated
    assert rated["charts/learner_env_steps_per_s"] <= rated["env_steps"] - restored["env_steps"], rated
    # the share of that interval the learner waited for batches: the actors, or the rate limiter, held it back
    assert 0.0 <= rated["charts/learner_wait_fraction"] < 1.0, rated
    second = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert second["updates"] > first["updates"] > 100 and second["policy_version"] > first["policy_version"]
    assert 16000 <= second["env_steps"] < 16000 + 4000
    assert "restored" in (tmp_path / "runs" / "test" / "buffer.log").read_text()
    resumed_steps = [json.loads(line)["env_steps"] for line in metrics.read_text().splitlines()[first_rows:]]
    assert resumed_steps and min(resumed_steps) >= first["env_steps"], "the run's metrics go on from where they stopped"


def test_killing_the_launcher_outright_takes_every_service_with_it(tmp_path):
    """SIGKILL leaves the launcher no time to stop anything: the services must notice on their own.

    They are forked from the launcher's forkserver, which imported torch once for all three (and
    the trainer's evaluator from the trainer), and notice through it: it exits with the launcher."""
    proc, _ = launch(tmp_path, "budget.max_env_steps=10000000", "budget.target_eval_return=null")
    try:
        wait_for_line(proc, "services up")
        tree = descendants(proc.pid)
        assert len(tree) >= 5, tree
        (forkserver,) = [pid for pid in tree if parent_of(pid) == proc.pid and b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len([pid for pid in tree if parent_of(pid) == forkserver]) == 3  # buffer, trainer, rollout
        spawned = [pid for pid in tree if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert not spawned, "every process with torch is a fork of one that imported it"
        services = {pid for pid in tree if parent_of(pid) == forkserver}
        command = Path(f"/proc/{forkserver}/cmdline").read_bytes()
        forked = [pid for pid in tree if parent_of(pid) in services and Path(f"/proc/{pid}/cmdline").read_bytes() == command]
        assert len(forked) == 3  # the two rollout workers and the trainer's evaluator
    finally:
        proc.kill()
        proc.wait()
    assert not (left := left_alive(tree)), f"left behind: {left}"


def test_a_run_writes_only_in_its_run_folder_and_its_checkpoints(tmp_path):
    """W&B (its media and artifact folders, wandb-core's debug logs) and torch's compiler cache are
    written to a temporary folder the launcher removes at the end (`titan_rl.scratch`), not left in
    $TMPDIR and ~/.cache: the services it forks leave through os._exit, which runs no clean-up hook."""
    outside = {"TMPDIR": tmp_path / "tmp", "HOME": tmp_path / "home", "XDG_CACHE_HOME": tmp_path / "cache"}
    for folder in outside.values():
        folder.mkdir()
    env = {name: str(folder) for name, folder in outside.items()} | {"WANDB_MODE": "offline"}
    proc, _ = launch(tmp_path, "budget.max_env_steps=3000", "budget.target_eval_return=null", env=env)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert (tmp_path / "runs" / "test" / "wandb").is_dir(), "the W&B run itself is kept in the run folder"
    for name, folder in outside.items():
        assert not (left := sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))), f"left in ${name}: {left}"


def test_closing_the_terminal_stops_the_run_as_ctrl_c_does(tmp_path):
    """A dropped ssh session: the terminal hangs up and its foreground job, the launcher, gets
    SIGHUP. It stops the run in order, though nothing can be written to the terminal any more, and
    removes its temporary folder. It used to die on the spot, leaving that folder, with the services
    stopped through their forkserver; and a first cut hung on writing to the dead terminal."""
    (tmp_path / "tmp").mkdir()
    argv, _ = launch_argv(tmp_path, NEVER_ENDS)
    with Terminal(argv, launch_env(env={"TMPDIR": str(tmp_path / "tmp")})) as terminal:
        terminal.until("services up")
        time.sleep(3)  # let it train a little
        tree = descendants(terminal.proc.pid)
        assert len(tree) >= 5, tree
        terminal.hang_up()
        assert terminal.proc.wait(timeout=90) == 0
    assert not (left := left_alive(tree)), f"left behind: {left}"
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert summary["stop_reason"] == "trainer stopped by a signal; the run can be resumed"
    # what they printed once the terminal was gone is in the run folder, not lost
    assert "done: trainer stopped by a signal" in (tmp_path / "runs" / "test" / "launcher.log").read_text()
    assert "stopping: trainer stopped by a signal" in (tmp_path / "runs" / "test" / "trainer.log").read_text()
    assert (tmp_path / "checkpoint_last.pth").exists() and (tmp_path / "runs" / "test" / "buffer_snapshot.npz").exists()
    assert not (left := sorted(str(p) for p in (tmp_path / "tmp").rglob("*"))), f"left in $TMPDIR: {left}"


def test_under_nohup_the_run_outlives_its_terminal(tmp_path):
    argv, _ = launch_argv(tmp_path, NEVER_ENDS, config=str(REPO / "config" / "cartpole.yaml"))
    with Terminal(["nohup", *argv], launch_env(env={"PYTHONPATH": str(REPO)}), cwd=tmp_path) as terminal:
        terminal.until("nohup.out")  # nohup's own word, the last the terminal gets
        wait_for_file_line(tmp_path / "nohup.out", "services up")
        terminal.hang_up()
        metrics = tmp_path / "runs" / "test" / "metrics.jsonl"
        time.sleep(2)
        rows = len(metrics.read_text().splitlines())
        time.sleep(3)
        assert terminal.proc.poll() is None and len(metrics.read_text().splitlines()) > rows, "it stopped training"
        terminal.proc.send_signal(signal.SIGTERM)
        assert terminal.proc.wait(timeout=90) == 0
    assert "stopped by a signal" in (tmp_path / "nohup.out").read_text()


@pytest.mark.parametrize("service", ["buffer", "rollout", "trainer"])
def test_a_service_started_by_hand_stops_in_order_when_its_terminal_closes(service, tmp_path):
    """`python -m titan_rl.<service>` in an ssh session on its host: each once died of the SIGHUP,
    the trainer without its last checkpoint, the buffer without its snapshot. The kernel signals
    the terminal's session leader; a login shell then signals each of its jobs' process groups,
    as done here, so the rollout service's workers get it too (and leave their stop to it)."""
    port = free_port("127.0.0.1")
    files = [f"logging.run_dir={tmp_path}/runs", "logging.run_name=alone", f"logging.checkpoint_path={tmp_path}/checkpoint.pth"]
    argv = [sys.executable, "-m", f"titan_rl.{service}", "--config", "config/cartpole.yaml", "--port", str(port), *files]
    with Terminal(argv, launch_env()) as terminal:
        terminal.until(f"{service} serving on")
        wait_until_caught(terminal.proc.pid, signal.SIGHUP)  # its handlers come a moment after its log line
        tree = descendants(terminal.proc.pid)
        terminal.hang_up()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(terminal.proc.pid, signal.SIGHUP)  # what the shell would pass on to its job
        assert terminal.proc.wait(timeout=60) == 0
    assert not (left := left_alive(tree)), f"left behind: {left}"
    # what it printed once the terminal was gone: to its log in the run folder (it went to /dev/null)
    last_words = "done (trainer stopped by a signal" if service == "trainer" else f"{service}: stopped"
    assert last_words in re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "runs" / "alone" / f"{service}.log").read_text())  # Rich's colours
    if service == "trainer":
        summary = json.loads((tmp_path / "runs" / "alone" / "summary.json").read_text())
        assert summary["stop_reason"].startswith("trainer stopped by a signal")


def wait_until_caught(pid: int, sig: signal.Signals, timeout_s: float = 30) -> None:
    """Until process `pid` has a handler for `sig` (its SigCgt mask in /proc)."""
    deadline = time.monotonic() + timeout_s
    while not int(re.search(r"SigCgt:\s*([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text())[1], 16) >> (sig - 1) & 1:
        assert time.monotonic() < deadline, f"process {pid} never caught {sig.name}"
        time.sleep(0.1)


def wait_for_file_line(path: Path, text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} never written to {path}"
        time.sleep(0.2)


def test_the_launcher_locks_its_services_with_a_fresh_token(tmp_path, monkeypatch):
    import grpc

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    proc, addresses = launch(tmp_path, "budget.max_env_steps=10000000", "budget.target_eval_return=null", token=None)
    try:
        wait_for_line(proc, "services up")
        calls = {
            "buffer_server": lambda: BufferClient(addresses["buffer_server"]).stub.Info(buffer_pb2.InfoRequest(), timeout=5),
            "rollout_server": lambda: RolloutClient(addresses["rollout_server"]).stub.Stats(rollout_pb2.StatsRequest(), timeout=5),
            "trainer_server": lambda: TrainerClient(addresses["trainer_server"]).stop(),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "stopped by a signal" in output, output


def preloading_forkservers() -> set[int]:
    """Every forkserver the launcher starts, and every process forked from one (on this machine)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"titan_rl.buffer.process" in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.config.gama=0.9", "config/cartpole.yaml: unknown key algorithm.config.gama (did you mean algorithm.config.gamma?)"),
        ("policy.kwargs.hidden_sizes=[-1]", "config/cartpole.yaml: policy: cannot build models.simple_policy.SimplePolicy with kwargs"),
    ],
)
def test_a_bad_config_key_fails_before_anything_starts(tmp_path, override, message):
    """Nothing left behind either: the forkserver the launcher started is gone with it, not a few
    seconds later once its imports are done (holding the launcher's stdout open until then)."""
    before = preloading_forkservers()
    with open(tmp_path / "stderr", "w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "titan_rl.launch", override], cwd=REPO, stderr=stderr)
        assert proc.wait(timeout=60) == 2
        assert not (preloading_forkservers() - before)
        stderr.seek(0)
        output = stderr.read()
    assert message in output
    assert "Traceback" not in output


@pytest.mark.parametrize("service", ["buffer", "rollout", "trainer"])
def test_each_service_runs_alone_with_host_and_port_flags(service, tmp_path):
    port = free_port("127.0.0.1")
    # its files go to tmp_path: the defaults (runs/, checkpoint.pth) would land in, and clobber, the user's
    files = [f"logging.run_dir={tmp_path}/runs", f"logging.checkpoint_path={tmp_path}/checkpoint.pth"]
    (tmp_path / "tmp").mkdir()  # its $TMPDIR: left empty
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            f"titan_rl.{service}",
            "--config",
            "config/cartpole.yaml",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *files,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "TMPDIR": str(tmp_path / "tmp")},
    )
    from titan_rl.rpc import is_serving

    try:
        wait_serving(proc, port)
        assert is_serving(f"127.0.0.1:{port}")
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0 and "Traceback" not in output, output
    assert not (left := sorted(str(p) for p in (tmp_path / "tmp").rglob("*"))), f"left in $TMPDIR: {left}"


def test_rollout_workers_share_one_import_of_torch(tmp_path):
    """Workers are forked from the service, which imported the worker module (torch, gymnasium),
    instead of each spawned worker importing it again: each import costs about 2 CPU-seconds of
    everyone's start-up on a small machine."""
    port = free_port("127.0.0.1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "titan_rl.rollout", "--port", str(port), "rollout_server.num_workers=3"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_serving(proc, port)
        with_torch = [pid for pid in descendants(proc.pid) if maps_torch(pid)]
        assert [parent_of(pid) for pid in with_torch] == [proc.pid] * 3
        service_command = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert all(Path(f"/proc/{pid}/cmdline").read_bytes() == service_command for pid in with_torch)  # forks, not spawned
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_a_killed_rollout_service_takes_its_workers_with_it():
    """Not after durability.peer_timeout_s without a trainer: at once."""
    port = free_port("127.0.0.1")
    command = [sys.executable, "-m", "titan_rl.rollout", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(proc, port)
        workers = {pid for pid in descendants(proc.pid) if maps_torch(pid)}
        assert len(workers) == 2
    finally:
        proc.kill()
        proc.wait()
    assert not (left := left_alive(workers)), f"left behind: {left}"


def test_rollout_stops_with_a_clear_error_when_the_policy_does_not_fit_the_env():
    result = subprocess.run(
        [sys.executable, "-m", "titan_rl.rollout", "--port", "0", "policy.kwargs={state_dim: 3, action_dim: 2}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "does not fit DQN on observations (4,)" in result.stderr and "stopping" in result.stderr


def test_trainer_refuses_an_unwritable_checkpoint_path_at_start(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "titan_rl.trainer", "--port", "0", f"logging.checkpoint_path={tmp_path}/a_file/ck.pth"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode != 0 and "logging.checkpoint_path=" in result.stderr and "Traceback" not in result.stderr
