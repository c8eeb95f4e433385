"""The trainer's gRPC face on a free port, backed by a real loop, buffer and policy store."""

import threading
from pathlib import Path

import grpc
import pytest
import torch

from tests.helpers import make_config
from titan_rl.buffer.client import BatchPrefetcher
from titan_rl.checkpoint import load_checkpoint
from titan_rl.metrics import MetricsLogger
from titan_rl.registry import build, build_policy
from titan_rl.rpc import make_server
from titan_rl.trainer.client import PolicySubscriber, TrainerClient
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
    policy = build_policy(cfg)
    store = PolicyStore()
    batches = BatchPrefetcher(address, cfg.train.batch_size)
    loop = TrainingLoop(cfg, build(cfg.trainer, "trainer", policy, cfg.train), batches, store, MetricsLogger(cfg, tmp_path / "run", "run"))
    server, port, _ = make_server("127.0.0.1", 0)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(loop, store), server)
    store.publish(policy.state_dict())
    server.start()
    yield f"127.0.0.1:{port}", loop, store, policy
    store.close()
    batches.close()
    server.stop(grace=None).wait()


def test_subscribers_get_the_current_weights_then_every_newer_version(trainer_server):
    address, _, store, policy = trainer_server
    subscriber = PolicySubscriber(address)
    try:
        assert subscriber.wait_first(timeout_s=10)
        version, state = subscriber.take()
        assert version == 0 and torch.equal(state["net.0.weight"], policy.state_dict()["net.0.weight"])
        with torch.no_grad():
            policy.net[0].weight.add_(1.0)
        store.publish(policy.state_dict())
        for _ in range(100):
            if (latest := subscriber.take()) is not None:
                break
            threading.Event().wait(0.05)
        assert latest[0] == 1 and torch.equal(latest[1]["net.0.weight"], policy.state_dict()["net.0.weight"])
    finally:
        subscriber.close()


def test_get_policy_status_checkpoint_and_stop(trainer_server, tmp_path):
    address, loop, _, _ = trainer_server
    stub = trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(address))
    assert stub.GetPolicy(trainer_pb2.GetPolicyRequest(), timeout=5).weights.version == 0
    client = TrainerClient(address)
    status = client.status()
    assert status.state == "waiting_for_data" and status.updates == 0 and status.policy_version == 0
    path = client.checkpoint(str(tmp_path / "on_demand.pth"))
    assert load_checkpoint(path)["counters"]["policy_version"] == 0
    (tmp_path / "a_file").write_text("")
    for bad in (tmp_path / "a_file" / "under_a_file.pth", tmp_path / "nul\0.pth", tmp_path):
        with pytest.raises(grpc.RpcError) as e:
            client.checkpoint(str(bad))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("path: "), bad
    client.stop()
    assert loop.run().stop_reason == "stop requested"


class BalancingPolicy(torch.nn.Module):
    """Pushes toward where the pole falls (angle + angular velocity): scores about 490 on CartPole."""

    def forward(self, obs):
        lean = obs[:, 2] + obs[:, 3]
        return torch.stack([-lean, lean], dim=1)


@pytest.mark.parametrize(("target", "evaluations"), [(400.0, 2), (None, 1), (501.0, 1)])
def test_an_evaluation_that_reaches_the_target_is_confirmed_on_new_episodes(trainer_server, tmp_path, target, evaluations):
    _, loop, _, _ = trainer_server
    loop.cfg = make_config(f"budget.target_eval_return={'null' if target is None else target}", *logging_overrides(tmp_path))
    loop.trainer.policy = BalancingPolicy()
    loop._evaluate()
    assert loop._evals == evaluations
    assert loop.last_eval > 450
