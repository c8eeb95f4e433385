"""Data-parallel learners (titan_rl/trainer/distributed.py): two learner processes on halves of a
batch end where one learner on the whole batch ends, and a two-learner run solves CartPole."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from tests.helpers import make_config
from tests.test_algorithms import fixed_batch

UPDATES = 3
ROWS = 64


def _learner(*overrides: str, seed: int = 0):
    from titan_rl.registry import build_algorithm, build_policy

    cfg = make_config(*overrides)
    torch.manual_seed(seed)
    return build_algorithm(cfg).make_learner(build_policy(cfg))


def _rank(rank: int, init_method: str, out_dir: str) -> None:
    from titan_rl.trainer.distributed import LearnerGroup, average_gradients

    learner = _learner("train.learners=2", seed=rank)  # rank 1 starts elsewhere: sharing rank 0's state must fix that
    group = LearnerGroup(rank, 2, init_method, timeout_s=60)
    group.share_from_rank_0(learner)
    average_gradients(learner.network, group.world_size)
    half = {name: values[rank * ROWS // 2 : (rank + 1) * ROWS // 2] for name, values in fixed_batch(ROWS, seed=1).items()}
    for _ in range(UPDATES):
        assert group.agree(True)
        learner.update(half)
    torch.save(learner.network.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    group.close()


def test_two_learners_on_halves_of_a_batch_match_one_learner_on_all_of_it(tmp_path):
    ctx = mp.get_context("spawn")
    init_method = f"file://{tmp_path / 'group'}"
    ranks = [ctx.Process(target=_rank, args=(rank, init_method, str(tmp_path))) for rank in (0, 1)]
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


@pytest.mark.e2e
def test_a_run_with_two_learner_processes_solves_cartpole(tmp_path):
    from tests.test_end_to_end import launch

    proc, _ = launch(tmp_path, "--seed", "1", "train.learners=2", "budget.max_env_steps=100000")
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output
    assert "learner group of 2" in output, output
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert summary["best_eval_return"] >= 475, summary


def test_an_on_policy_algorithm_refuses_several_learners_naming_file_and_key():
    from titan_rl.config import load_config
    from titan_rl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cartpole_impala.yaml: train.learners=2"):
        load_config("config/cartpole_impala.yaml", ["train.learners=2"])
