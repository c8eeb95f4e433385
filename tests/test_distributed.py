"""Data-parallel learners (titan_rl/trainer/distributed.py): two learner processes on halves of a
batch end where one learner on the whole batch ends, and a two-learner run solves CartPole."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import make_config
from tests.test_algorithms import fixed_batch
from titan_rl.launcher import free_port

UPDATES = 3
ROWS = 64


def _learner(*overrides: str, seed: int = 0):
    from titan_rl.registry import build_algorithm, build_policy

    cfg = make_config(*overrides)
    torch.manual_seed(seed)
    return build_algorithm(cfg).make_learner(build_policy(cfg))


def _rank(rank: int, address: str, out_dir: str) -> None:
    from titan_rl.trainer.distributed import LearnerGroup, average_gradients, group_store

    learner = _learner("train.learners=2", seed=rank)  # rank 1 starts elsewhere: sharing rank 0's state must fix that
    if rank == 1:
        learner.update(fixed_batch(ROWS, seed=3))  # and has taken a step of its own: optimizer state and update count differ
    group = LearnerGroup(rank, 2, group_store(address, rank, 2, timeout_s=60), timeout_s=60)
    group.share_from_rank_0(learner)
    average_gradients(learner.network, group)
    half = {name: values[rank * ROWS // 2 : (rank + 1) * ROWS // 2] for name, values in fixed_batch(ROWS, seed=1).items()}
    for update in range(UPDATES):
        assert group.agree(True, env_steps=1000 * update - 7 * rank)  # rank 1 brings a smaller count than rank 0...
        assert group.agreed_env_steps == 1000 * update  # ...but every schedule runs on rank 0's, the run's
        learner.update(half)
    torch.save(learner.network.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    group.close()


def test_two_learners_on_halves_of_a_batch_match_one_learner_on_all_of_it(tmp_path):
    ctx = mp.get_context("spawn")
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    ranks = [ctx.Process(target=_rank, args=(rank, address, str(tmp_path))) for rank in (1, 0)]  # rank 1 waits for rank 0
    for proc in ranks:
        proc.start()
    for proc in ranks:
        proc.join(120)
        assert proc.exitcode == 0
    one = _learner()
    for _ in range(UPDATES):
        one.update(fixed_batch(ROWS, seed=1))
    states = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, expected in one.network.state_dict().items():
        assert torch.equal(states[0][name], states[1][name]), f"{name}: the ranks drifted apart"
        torch.testing.assert_close(states[0][name], expected, rtol=1e-5, atol=1e-6, msg=f"{name}: not the combined batch's update")
    start = _learner().network.state_dict()
    assert any(not torch.allclose(start[name], one.network.state_dict()[name]) for name in start), "the updates changed nothing"


def _rank_of_a_group_that_loses_one(rank: int, address: str, dying_rank: int, out_dir: str) -> None:
    from types import SimpleNamespace

    from titan_rl.trainer.distributed import LearnerGroup, average_gradients, group_store
    from titan_rl.trainer.ranks import train_rank

    learner = _learner("train.learners=2")
    group = LearnerGroup(rank, 2, group_store(address, rank, 2, timeout_s=60), timeout_s=60)
    group.share_from_rank_0(learner)
    average_gradients(learner.network, group)
    if rank == dying_rank:
        assert group.agree(True)
        os._exit(0)  # gone without a word, as a killed process, between the agree and the gradients' all-reduce
    sample = SimpleNamespace(fields=fixed_batch(ROWS, seed=1), keys=None, weights=None)
    train_rank(learner, group, lambda: sample)  # the backward pass of its first update fails
    Path(out_dir, "survivor.txt").write_text(f"{group.lost}\n{learner.updates}")
    group.close()


@pytest.mark.parametrize("dying_rank", [0, 1])
def test_a_learner_whose_peer_dies_mid_run_stops_with_the_reason_instead_of_crashing(tmp_path, dying_rank):
    ctx = mp.get_context("spawn")
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    procs = {r: ctx.Process(target=_rank_of_a_group_that_loses_one, args=(r, address, dying_rank, str(tmp_path))) for r in (0, 1)}
    for proc in procs.values():
        proc.start()
    for proc in procs.values():
        proc.join(120)
    # what the survivor wrote after the failure is the check: gloo may still abort it (SIGABRT) at
    # exit, tearing down pairs whose peer died mid-collective, after everything is written
    assert (tmp_path / "survivor.txt").exists(), f"the surviving rank crashed before it could stop (exit {procs[1 - dying_rank].exitcode})"
    assert procs[1 - dying_rank].exitcode in (0, -signal.SIGABRT)
    lost, updates = (tmp_path / "survivor.txt").read_text().splitlines()
    assert lost.startswith("a rank is gone") and int(updates) == 0, lost


def _rank_told_how_the_run_ends(rank: int, address: str, run_ended: bool, out_dir: str) -> None:
    from titan_rl.trainer.distributed import LearnerGroup, group_store
    from titan_rl.trainer.ranks import train_rank

    learner = _learner("train.learners=2")
    group = LearnerGroup(rank, 2, group_store(address, rank, 2, timeout_s=60), timeout_s=60)
    group.share_from_rank_0(learner)
    if rank == 0:
        group.close(run_ended=run_ended)
        return
    train_rank(learner, group, lambda: None)  # waiting for batches that do not come: the store tells it to stop
    Path(out_dir, "rank1.txt").write_text(str(group.run_ended()))
    group.close()


@pytest.mark.parametrize("run_ended", [True, False])
def test_a_waiting_rank_learns_whether_the_run_ended_or_only_the_trainer_stopped(tmp_path, run_ended):
    ctx = mp.get_context("spawn")
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    procs = [ctx.Process(target=_rank_told_how_the_run_ends, args=(r, address, run_ended, str(tmp_path))) for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    assert (tmp_path / "rank1.txt").read_text() == str(run_ended)


@pytest.mark.e2e
def test_a_run_with_two_learner_processes_learns_cartpole(tmp_path):
    """The bar of test_end_to_end's algorithm runs (300), which two learners reach well before a full solve."""
    from tests.test_end_to_end import launch

    overrides = ("train.learners=2", "budget.max_env_steps=100000", "budget.target_eval_return=300", "eval.interval_env_steps=1000")
    proc, _ = launch(tmp_path, "--seed", "1", *overrides)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output
    assert "learner group of 2" in output, output
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert summary["best_eval_return"] >= 300, summary


def test_an_on_policy_algorithm_refuses_several_learners_naming_file_and_key():
    from titan_rl.config import load_config
    from titan_rl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cartpole_impala.yaml: train.learners=2"):
        load_config("config/cartpole_impala.yaml", ["train.learners=2"])


def test_train_device_resolves_to_the_cpu_here_and_cuda_without_a_gpu_fails_naming_the_key():
    from titan_rl.errors import ConfigError
    from titan_rl.trainer.device import distributed_backend, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto", local_rank=1).type == "cuda"
        assert distributed_backend(resolve_device("cuda")) == "nccl"
        return
    assert resolve_device("auto") == torch.device("cpu")
    assert distributed_backend(resolve_device("auto")) == "gloo"
    with pytest.raises(ConfigError, match=r"train.device=cuda, but torch .* sees no GPU"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: train.device=cuda is valid here")
def test_launch_with_train_device_cuda_and_no_gpu_stops_before_anything_starts(tmp_path):
    import subprocess
    import sys

    from tests.test_end_to_end import REPO

    result = subprocess.run(
        [sys.executable, "-m", "titan_rl.launch", "train.device=cuda", f"logging.run_dir={tmp_path}/runs"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "config/cartpole.yaml: train.device=cuda" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_checkpoints_and_evaluation_snapshots_hold_cpu_copies_that_load_back():
    from titan_rl.algorithm import cpu_state
    from titan_rl.evaluation import snapshot

    learner = _learner()
    learner.update(fixed_batch(ROWS, seed=1))
    state = learner.state_dict()
    copied = snapshot(state)
    assert copied["policy"]._metadata == state["policy"]._metadata  # what load_state_dict reads versions from
    shared = cpu_state(state)  # for a checkpoint written under the lock: no copy on the CPU
    name, tensor = next(iter(state["policy"].items()))
    assert shared["policy"][name].data_ptr() == tensor.data_ptr() and copied["policy"][name].data_ptr() != tensor.data_ptr()
    learner.update(fixed_batch(ROWS, seed=2))
    assert not torch.equal(copied["policy"][name], learner.network.state_dict()[name]), "the snapshot moved with the learner"
    restored = _learner(seed=5)
    restored.load_state_dict(copied)
    assert torch.equal(restored.network.state_dict()[name], copied["policy"][name]) and restored.updates == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "1"], "train.learner_group_address is empty"),
        (["--rank", "2", "train.learners=2", "train.learner_group_address=127.0.0.1:29999"], "--rank 2: must be in 1..1"),
    ],
)
def test_a_learner_rank_started_wrongly_says_why_and_joins_nothing(args, message):
    import subprocess
    import sys

    from tests.test_end_to_end import REPO

    result = subprocess.run(
        [sys.executable, "-m", "titan_rl.trainer.learner", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
