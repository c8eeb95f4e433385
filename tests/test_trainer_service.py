"""The trainer's gRPC face on a free port, backed by a real loop, buffer and policy store."""

import threading
from pathlib import Path

import grpc
import imageio.v2 as imageio
import pytest
import torch

from tests.helpers import make_config
from titan_rl.checkpoint import load_checkpoint, save_checkpoint
from titan_rl.clients.buffer import BatchPrefetcher
from titan_rl.clients.trainer import PolicySubscriber, TrainerClient
from titan_rl.evaluation import Evaluator
from titan_rl.metrics import MetricsLogger
from titan_rl.registry import build_algorithm, build_policy
from titan_rl.rpc import make_server
from titan_rl.trainer.loop import TrainingLoop
from titan_rl.trainer.policy_store import PolicyStore
from titan_rl.trainer.service import TrainerServicer
from titan_rl.v1 import trainer_pb2, trainer_pb2_grpc


def logging_overrides(tmp_path: Path) -> list[str]:
    return ["logging.console=false", f"logging.run_dir={tmp_path}", f"logging.checkpoint_path={tmp_path}/ck.pth"]


@pytest.fixture
def trainer_server(buffer_server, tmp_path: Path):
    address, _ = buffer_server
    cfg = make_config(*logging_overrides(tmp_path))
    algorithm, policy = build_algorithm(cfg), build_policy(cfg)
    store = PolicyStore()
    batches = BatchPrefetcher(address, cfg.train.batch_size)
    evaluator = Evaluator(cfg, cfg.eval.episodes)
    logger = MetricsLogger(cfg, tmp_path / "run", "run")
    loop = TrainingLoop(cfg, algorithm.make_learner(policy), batches, store, logger, evaluator)
    server, port, _ = make_server("127.0.0.1", 0)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(loop, store), server)
    store.publish(policy.state_dict(), env_steps=123)
    server.start()
    yield f"127.0.0.1:{port}", loop, store, policy
    store.close()
    evaluator.close()
    batches.close()
    server.stop(grace=None).wait()


def test_subscribers_get_the_current_weights_then_every_newer_version(trainer_server):
    address, _, store, policy = trainer_server
    subscriber = PolicySubscriber(address)
    try:
        assert subscriber.wait_first(timeout_s=10)
        version, env_steps, state = subscriber.take()
        assert (version, env_steps) == (0, 123) and torch.equal(state["net.0.weight"], policy.state_dict()["net.0.weight"])
        with torch.no_grad():
            policy.net[0].weight.add_(1.0)
        store.publish(policy.state_dict(), env_steps=456)
        for _ in range(100):
            if (latest := subscriber.take()) is not None:
                break
            threading.Event().wait(0.05)
        assert latest.version == 1 and latest.env_steps == 456
        assert torch.equal(latest.state["net.0.weight"], policy.state_dict()["net.0.weight"])
    finally:
        subscriber.close()


def test_a_subscriber_sent_to_another_service_stops_instead_of_retrying_for_ever(buffer_server):
    """The buffer's address given as the trainer's (a swapped port in a config): every WatchPolicy is
    UNIMPLEMENTED, and the subscriber retried it with back-off for as long as the worker lived."""
    address, _ = buffer_server
    subscriber = PolicySubscriber(address)
    try:
        assert subscriber.refused.wait(timeout=10), "the subscriber still retries"
        assert subscriber.ended() and not subscriber.gone.is_set() and not subscriber.finished.is_set()
        assert subscriber.refusal.startswith(f"trainer {address} refused the policy stream: UNIMPLEMENTED")
    finally:
        subscriber.close()


def test_get_policy_status_checkpoint_and_stop(trainer_server, tmp_path):
    address, loop, _, _ = trainer_server
    stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(address))
    assert stub.GetPolicy(trainer_pb2.GetPolicyRequest(), timeout=5).weights.version == 0
    client = TrainerClient(address)
    status = client.status()
    assert status.state == "waiting_for_data" and status.updates == 0 and status.policy_version == 0
    path = client.checkpoint("on_demand.pth")
    assert Path(path) == tmp_path / "on_demand.pth" and load_checkpoint(path)["counters"]["policy_version"] == 0
    assert client.checkpoint("on_demand.pth") == path  # a checkpoint may replace a checkpoint
    client.stop()
    assert loop.run().stop_reason == "stop requested"


def test_a_checkpoint_call_writes_only_checkpoints_by_file_name_beside_the_configured_one(trainer_server, tmp_path):
    address, _, _, _ = trainer_server
    client = TrainerClient(address)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "user.pth").write_text("my notes")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.pth"
    (tmp_path / "link.pth").symlink_to(outside)
    for bad in (
        "a_file/under_a_file.pth",
        "nul\0.pth",
        ".",
        str(tmp_path / "abs.pth"),
        "../escape.pth",
        "notes.txt",
        "user.pth",
        "link.pth",
        "new/folders/x.pth",  # once created any folder below the checkpoint's: a .pth in .venv's site-packages broke Python
        ".venv.pth",
        "a\\b.pth",
    ):
        with pytest.raises(grpc.RpcError) as e:
            client.checkpoint(bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("path: "), bad
    assert (tmp_path / "user.pth").read_text() == "my notes"
    assert not outside.exists() and not (tmp_path.parent / "escape.pth").exists() and not (tmp_path / "abs.pth").exists()
    assert not (tmp_path / "new").exists() and not (tmp_path / ".venv.pth").exists()
    assert not list(tmp_path.glob(".*tmp*")), "a failed write left its temp file behind"


def test_a_checkpoint_call_never_replaces_the_kept_best_policy(trainer_server, tmp_path):
    """With no name, a call wrote the current, unscored learner over ck.pth: the kept best policy was
    lost, and a restarted trainer, finding no scores in it, took the run for one without a best."""
    address, loop, _, _ = trainer_server
    kept = loop.save(tmp_path / "ck.pth", eval_returns=[300.0] * 20)
    client = TrainerClient(address)
    assert Path(client.checkpoint()) == tmp_path / "ck_last.pth"  # the learner now: what --resume continues
    with pytest.raises(grpc.RpcError) as e:
        client.checkpoint("ck.pth")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is the kept checkpoint" in e.value.details()
    assert load_checkpoint(kept)["eval_returns"] == [300.0] * 20


def test_a_failed_write_removes_its_temp_file(tmp_path):
    from titan_rl.checkpoint import save_checkpoint
    from titan_rl.errors import TitanError

    (tmp_path / "a_dir").mkdir()
    with pytest.raises(TitanError, match="cannot write checkpoint"):
        save_checkpoint(tmp_path / "a_dir", make_config(), {"policy": {}}, {}, None)
    assert [p.name for p in tmp_path.iterdir()] == ["a_dir"]


def balancing_weights() -> dict[str, torch.Tensor]:
    """A SimplePolicy(4, 2, [2]) that pushes toward where the pole falls (angle + angular velocity): about 490 on CartPole."""
    return {
        "net.0.weight": torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, -1.0, -1.0]]),
        "net.0.bias": torch.zeros(2),
        "net.2.weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
        "net.2.bias": torch.zeros(2),
    }


@pytest.mark.parametrize(("confirm_from", "episodes"), [(400.0, 40), (float("inf"), 20), (501.0, 20)])
def test_an_evaluation_that_reaches_confirm_from_is_confirmed_on_new_episodes(confirm_from, episodes):
    from titan_rl.evaluation import EvalJob

    cfg = make_config("policy.kwargs={state_dim: 4, action_dim: 2, hidden_sizes: [2]}")
    evaluator = Evaluator(cfg, 20)
    try:
        job = EvalJob(0, {"policy": balancing_weights()}, seed=1, confirm_seed=21, confirm_from=confirm_from)
        assert evaluator.submit(job)
        assert not evaluator.submit(job)  # busy: the next interval brings a fresher one
        (result,) = evaluator.results(wait_s=60)
        assert result.job is job and len(result.returns) == episodes and sum(result.returns) / episodes > 450
        assert evaluator.idle
    finally:
        evaluator.close()


def test_an_evaluation_that_cannot_load_its_weights_says_why():
    from titan_rl.errors import TitanError
    from titan_rl.evaluation import EvalJob

    evaluator = Evaluator(make_config(), 2)
    try:
        assert evaluator.submit(EvalJob(0, {"policy": {"net.0.weight": torch.zeros(3)}}, seed=1, confirm_seed=2, confirm_from=0.0))
        with pytest.raises(TitanError, match="evaluation failed: RuntimeError"):
            evaluator.results(wait_s=60)
    finally:
        evaluator.close()


def test_the_evaluator_records_a_greedy_episode_of_a_checkpoint_and_still_scores_after_a_failed_one(tmp_path):
    from titan_rl.errors import TitanError
    from titan_rl.evaluation import EvalJob, VideoJob

    cfg = make_config("policy.kwargs={state_dim: 4, action_dim: 2, hidden_sizes: [2]}")
    checkpoint = save_checkpoint(tmp_path / "ck.pth", cfg, {"policy": balancing_weights()}, {}, None)
    evaluator = Evaluator(cfg, 2)
    try:
        with pytest.raises(TitanError, match="no such checkpoint"):
            evaluator.record(VideoJob(str(tmp_path / "missing.pth"), str(tmp_path / "missing.mp4"), seed=1), timeout_s=60)
        episode_return, length = evaluator.record(VideoJob(str(checkpoint), str(tmp_path / "v.mp4"), seed=1), timeout_s=60)
        assert episode_return == length > 100  # CartPole pays 1 a step
        with imageio.get_reader(tmp_path / "v.mp4", format="FFMPEG") as reader:
            assert reader.get_data(0).shape == (400, 600, 3) and reader.count_frames() == length + 1  # the reset frame too
        assert evaluator.submit(EvalJob(0, {"policy": balancing_weights()}, seed=1, confirm_seed=3, confirm_from=float("inf")))
        (result,) = evaluator.results(wait_s=60)
        assert len(result.returns) == 2
        with pytest.raises(TitanError, match="still scoring"):
            evaluator.submit(EvalJob(0, {"policy": balancing_weights()}, seed=1, confirm_seed=3, confirm_from=float("inf")))
            evaluator.record(VideoJob(str(checkpoint), str(tmp_path / "v2.mp4"), seed=1), timeout_s=60)
    finally:
        evaluator.close()


def test_evaluation_runs_off_the_learner_thread_and_keeps_the_scored_weights(trainer_server, tmp_path):
    _, loop, _, _ = trainer_server
    loop.env_steps = 2500
    assert loop._submit_eval() and not loop._submit_eval()  # returns at once; a second job waits for the first
    (result,) = loop.evaluator.results(wait_s=60)
    loop._record_eval(result)
    assert loop.best_eval == loop.last_eval and result.job.env_steps == 2500
    assert len(result.returns) == 2 * loop.cfg.eval.episodes, "a first score is a new best: confirmed on new episodes"
    saved = load_checkpoint(tmp_path / "ck.pth")
    assert saved["eval_returns"] == result.returns and saved["counters"]["env_steps"] == 2500
    for name, tensor in result.job.state["policy"].items():
        assert torch.equal(saved["policy"][name], tensor)


BARS = [(None, 475.0, float("-inf")), (100.0, None, 100.0), (100.0, 475.0, 100.0), (500.0, 475.0, 475.0)]


@pytest.mark.parametrize(("best", "target", "bar"), BARS)
def test_an_evaluation_is_played_again_from_the_lower_of_the_best_and_the_target(best, target, bar):
    from titan_rl.evaluation import confirmation_bar

    assert confirmation_bar(best, target) == bar


def test_an_evaluation_that_cannot_beat_the_best_or_reach_the_target_is_not_played_again(trainer_server):
    _, loop, _, _ = trainer_server
    loop.best_eval, loop.env_steps = 1e6, 2500
    assert loop._submit_eval()
    (result,) = loop.evaluator.results(wait_s=60)
    assert result.job.confirm_from == loop.cfg.budget.target_eval_return
    assert len(result.returns) == loop.cfg.eval.episodes, "an untrained policy is far below the target"


def test_the_mean_over_both_sets_decides_the_kept_checkpoint(trainer_server, tmp_path):
    """A lucky first set of episodes that the second set does not bear out keeps the old best."""
    from titan_rl.evaluation import EvalJob, EvalResult, snapshot

    _, loop, _, _ = trainer_server

    def record(returns: list[float], bar: float) -> None:
        loop._record_eval(EvalResult(EvalJob(1000, snapshot(loop.learner.state_dict()), 1, 21, bar), returns))

    record([100.0] * 40, float("-inf"))
    kept = load_checkpoint(tmp_path / "ck.pth")["eval_returns"]
    record([150.0] * 20 + [20.0] * 20, 100.0)  # a first mean above the best, 85 over both sets
    assert (loop.best_eval, loop.last_eval) == (100.0, 85.0)
    assert load_checkpoint(tmp_path / "ck.pth")["eval_returns"] == kept
    record([300.0] * 20 + [20.0] * 20, 100.0)  # 160 over both sets
    assert loop.best_eval == 160.0
    assert load_checkpoint(tmp_path / "ck.pth")["eval_returns"] == [300.0] * 20 + [20.0] * 20


def test_a_run_the_target_ends_keeps_as_its_last_checkpoint_the_weights_that_reached_it(trainer_server):
    """Evaluation runs beside learning: the updates made while the run's last evaluation was played
    took the last policy of 7 of 20 CartPole runs whose evaluation had confirmed >= 495 to 120-452."""
    from titan_rl.evaluation import EvalJob, EvalResult, snapshot

    _, loop, _, _ = trainer_server
    target = loop.cfg.budget.target_eval_return

    def record(env_steps: int) -> dict:
        state = snapshot(loop.learner.state_dict())
        loop._record_eval(EvalResult(EvalJob(env_steps, state, 1, 21, target), [target] * 40))
        return state

    reached = record(1000)
    with torch.no_grad():  # what the learner learns while the result comes back
        for parameter in loop.learner.network.parameters():
            parameter.add_(1.0)
    record(2000)  # at the target too, not above it: the first one ended the run
    last = load_checkpoint(loop._save_last(run_ends=True))
    assert last["counters"]["env_steps"] == 1000
    assert all(torch.equal(last["policy"][name], value) for name, value in reached["policy"].items())
    resumed_from = load_checkpoint(loop._save_last(run_ends=False))  # a trainer stopped to be resumed: the learner as it is
    assert not torch.equal(resumed_from["policy"]["net.0.weight"], reached["policy"]["net.0.weight"])


def test_a_signal_after_the_loop_ended_the_run_does_not_make_it_resumable(trainer_server):
    """A SIGTERM during the final evaluation turned a run its budget had ended into one to resume: the
    actors and the buffer were never told that it ended, and waited for a trainer that had nothing left to do."""
    _, loop, _, _ = trainer_server
    loop.env_steps = loop.cfg.budget.max_env_steps
    save_last = loop._save_last

    def signalled_while_saving(run_ends: bool):
        loop.stop(end_run=False)  # what the trainer's SIGTERM handler calls
        return save_last(run_ends)

    loop._save_last = signalled_while_saving
    loop.run()
    assert loop.ends_run


def test_a_checkpoint_name_that_is_a_symlink_loop_is_refused_by_name(tmp_path):
    """Path.resolve raises RuntimeError on a loop before Python 3.13: that escaped as UNKNOWN."""
    from titan_rl.checkpoint import requested_path
    from titan_rl.errors import TitanError

    (tmp_path / "a.pth").symlink_to(tmp_path / "b.pth")
    (tmp_path / "b.pth").symlink_to(tmp_path / "a.pth")
    with pytest.raises(TitanError, match="'a.pth' cannot name a file"):
        requested_path("a.pth", tmp_path / "checkpoint.pth")


EVALUATOR_OWNER = """
import os, signal, struct
from tests.helpers import make_config
from titan_rl.evaluation import Evaluator

evaluator = Evaluator(make_config(), 2)
evaluator.start()
print(evaluator._process.pid, flush=True)
# the first bytes of a job too large for the pipe, as when the trainer is killed in the middle of sending one
os.write(evaluator._jobs._writer.fileno(), struct.pack("!i", 1_000_000) + bytes(1000))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_evaluator_exits_when_the_trainer_dies_in_the_middle_of_sending_a_job():
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.helpers import REPO

    owner = subprocess.run([sys.executable, "-c", EVALUATOR_OWNER], cwd=REPO, capture_output=True, text=True, timeout=120)
    evaluator_pid = int(owner.stdout.split()[0])

    def running() -> bool:
        try:
            return Path(f"/proc/{evaluator_pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 60
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(), "the evaluator outlived its trainer, blocked on a half-sent job"


def test_closing_the_evaluator_while_a_job_sits_unread_does_not_raise():
    """As when training fails in the first seconds after the first evaluation was submitted, while
    the evaluator still imports: close() runs in the trainer's `finally` and must not hide the error."""
    import os
    import signal

    from titan_rl.evaluation import EvalJob

    evaluator = Evaluator(make_config("policy.kwargs={state_dim: 4, action_dim: 2, hidden_sizes: [2]}"), 2)
    evaluator.start()
    pid = evaluator._process.pid
    os.kill(pid, signal.SIGSTOP)  # it reads nothing: the job queue (one slot) stays full
    try:
        assert evaluator.submit(EvalJob(0, {"policy": balancing_weights()}, seed=1, confirm_seed=3, confirm_from=0.0))
        evaluator.close()
    finally:
        os.kill(pid, signal.SIGKILL)


def test_status_reads_the_metrics_while_the_learner_adds_new_ones(trainer_server):
    """Status ran on a server thread over the dict the learner thread grows (new keys appear as
    replicas and evaluations do): 'dictionary changed size during iteration' came back as UNKNOWN."""
    _, loop, _, _ = trainer_server
    done = threading.Event()

    def log_new_keys() -> None:
        for i in range(1000):
            loop._log({f"replicas/{i}/episodes": float(i)})
        done.set()

    writer = threading.Thread(target=log_new_keys)
    writer.start()
    try:
        while not done.is_set():
            loop.status()
    finally:
        writer.join()


def test_the_console_line_shows_a_dash_for_a_figure_not_measured_yet(trainer_server, capsys):
    """An evaluation can be logged before the first rates: its line read "0 updates/s | ... loss nan"."""
    from titan_rl.metrics import ConsoleProgress

    _, loop, _, _ = trainer_server
    loop.logger.progress = ConsoleProgress(1000, enabled=True)  # plain lines: pytest's stdout is no terminal
    loop._log({"eval/mean_return": 9.0}, env_steps=0)
    line = capsys.readouterr().out
    assert "- steps/s | - updates/s | return - |" in line and "loss - |" in line and "nan" not in line, line
