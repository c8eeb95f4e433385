"""Contract tests every algorithm in trainers/ gets with no list to edit, plus each shipped algorithm's own behaviour.

Every concrete subclass of titan_rl.algorithm.Algorithm defined in a module of trainers/ is found
by `discover_algorithms`, built with its own tiny network (`Algorithm.tiny_network`), and must:
build from its config, act on a batch of observations, write records that match its record spec,
carry them through a real buffer service, update on a sampled batch with finite metrics, and
round-trip its whole learner state through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, make_config
from titan_rl.algorithm import Algorithm, to_batch
from titan_rl.buffer.service import BufferServicer, tables_for
from titan_rl.clients.buffer import BatchPrefetcher, BufferClient, ChunkSender
from titan_rl.dry_run import check_records
from titan_rl.errors import ConfigError
from titan_rl.on_policy import SamplingActor
from titan_rl.registry import build_algorithm
from titan_rl.rollout.actor import VectorActor
from titan_rl.rpc import make_server
from titan_rl.v1 import buffer_pb2_grpc
from trainers.impala import IMPALA


def discover_algorithms(package_dir: Path, package: str) -> list[str]:
    """Dotted paths of the Algorithm subclasses each module of `package` defines, but private ones
    (`_Base`): an abstract one, a hook misspelled, fails its contract tests naming what it lacks."""
    found = []
    for module_info in pkgutil.iter_modules([str(package_dir)]):
        module = importlib.import_module(f"{package}.{module_info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Algorithm) and obj.__module__ == module.__name__ and not name.startswith("_"):
                found.append(f"{module.__name__}.{name}")
    return sorted(found)


ALGORITHMS = discover_algorithms(REPO / "trainers", "trainers")
VARIANTS = [(path, ()) for path in ALGORITHMS] + [("trainers.dqn.DQN", ("algorithm.config.replay=prioritized",))]


def test_the_shipped_algorithms_are_discovered():
    assert {"trainers.dqn.DQN", "trainers.qr_dqn.QRDQN", "trainers.impala.IMPALA"} <= set(ALGORITHMS)


def test_an_algorithm_placed_in_a_package_is_discovered_without_a_list(tmp_path, monkeypatch):
    package = tmp_path / "my_trainers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mine.py").write_text("from trainers.dqn import DQN\n\n\nclass MyDQN(DQN):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert discover_algorithms(package, "my_trainers") == ["my_trainers.mine.MyDQN"]
    finally:
        for name in [m for m in sys.modules if m.startswith("my_trainers")]:
            del sys.modules[name]


def test_an_algorithm_with_a_hook_misspelled_gets_contract_tests_that_fail_naming_the_hook(tmp_path, monkeypatch):
    """It was skipped by the contract tests as abstract (a suite that passed), and `bash run.sh` raised
    Python's "Can't instantiate abstract class"; a private base (`_Base`) is left to its subclasses."""
    package = tmp_path / "my_trainers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "typo.py").write_text(
        "from titan_rl.off_policy import OffPolicyAlgorithm\n\n\n"
        "class _Base(OffPolicyAlgorithm):\n    pass\n\n\n"
        "class Typo(_Base):\n    def make_lerner(self, network):\n        raise NotImplementedError\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert discover_algorithms(package, "my_trainers") == ["my_trainers.typo.Typo"]
        with pytest.raises(ConfigError, match=r"algorithm.path='my_trainers.typo.Typo': Typo does not define make_learner, which Algo"):
            build("my_trainers.typo.Typo")
    finally:
        for name in [m for m in sys.modules if m.startswith("my_trainers")]:
            del sys.modules[name]


def build(path: str, *overrides: str):
    cfg = make_config(f"algorithm.path={path}", "algorithm.config={}", "train.batch_size=16", "train.min_buffer_size=16", *overrides)
    algorithm = build_algorithm(cfg)
    torch.manual_seed(0)
    network = algorithm.tiny_network()
    algorithm.check_network(network)
    return cfg, algorithm, network


def collect(algorithm: Algorithm, network, rows: int) -> tuple[dict[str, np.ndarray], int]:
    """At least `rows` records from real CartPole steps, with the env steps they took."""
    actor = VectorActor("CartPole-v1", 4, algorithm.make_actor(network, 0, seed=0), algorithm.make_adder(4), seed=0)
    parts, steps = [], 0
    try:
        while sum(len(p["reward"]) for p in parts) < rows:
            result = actor.step()
            parts.append(result.records)
            steps += result.env_steps
    finally:
        actor.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, steps


def test_a_learner_that_sets_no_priorities_on_a_prioritized_batch_is_stopped_at_its_first_update():
    """It learned on from uniform replay without a word: every item kept the priority it was inserted with."""
    cfg, algorithm, network = build("tests.plugins.SetsNoPriorities", "algorithm.config.replay=prioritized")
    records, _ = collect(algorithm, network, 16)
    rows = len(records["reward"])
    batch = to_batch(records, np.arange(rows), np.ones(rows, np.float32))
    with pytest.raises(ConfigError, match=r"set no new priority per row \(batch.new_priorities: none, want shape \(\d+,\)\)"):
        algorithm.make_learner(network).update(batch)


class _ValueRecordingActor(SamplingActor):
    def act(self, obs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        actions, extras = super().act(obs)
        return actions, {**extras, "value": np.full(len(obs), 0.5, np.float32)}


class RecordsValues(IMPALA):
    extras = {**IMPALA.extras, "value": ((), np.dtype(np.float32))}

    def make_actor(self, network, worker_index: int, seed: int) -> SamplingActor:
        return _ValueRecordingActor(self, network, seed)


def test_an_on_policy_algorithm_records_the_extras_it_declares_with_its_actor():
    """A per-step field more (PPO's value at acting time) took overriding record_spec, make_adder and
    make_actor around a module constant; now it is the class's `extras` and its actor."""
    cfg, algorithm, network = build(f"{__name__}.RecordsValues")
    records, _ = collect(algorithm, network, 4)
    assert records["value"].shape[1:] == (cfg.algorithm.config.segment_length,) and (records["value"] == 0.5).all()
    check_records(cfg, algorithm, records)  # as the buffer checks them


@pytest.fixture
def served():
    """Start a real buffer service with an algorithm's tables; yields a function (algorithm, seed) -> address."""
    servers = []

    def serve(algorithm: Algorithm) -> str:
        tables = tables_for(algorithm, seed=0)
        server, port, _ = make_server("127.0.0.1", 0)
        buffer_pb2_grpc.add_BufferServiceServicer_to_server(BufferServicer(tables), server)
        server.start()
        servers.append((server, tables))
        return f"127.0.0.1:{port}"

    yield serve
    for server, tables in servers:
        for table in tables.values():
            table.close()
        server.stop(grace=None).wait()


@pytest.mark.parametrize(("path", "overrides"), VARIANTS)
def test_acts_on_a_batch_of_observations(path, overrides):
    _, algorithm, network = build(path, *overrides)
    obs = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    actions, extras = algorithm.make_actor(network, 0, seed=0).act(obs)
    assert actions.shape == (5,) and ((0 <= actions) & (actions < 2)).all()
    assert all(len(v) == 5 for v in extras.values())
    assert algorithm.greedy_actions(network, obs).shape == (5,)


@pytest.mark.parametrize(("path", "overrides"), VARIANTS)
def test_records_match_the_spec_and_round_trip_through_a_real_buffer_then_update(path, overrides, served):
    cfg, algorithm, network = build(path, *overrides)
    records, env_steps = collect(algorithm, network, rows=cfg.train.batch_size * 2)
    spec = algorithm.record_spec()
    assert set(records) == set(spec)
    for name, (shape, dtype) in spec.items():
        assert records[name].shape[1:] == shape and records[name].dtype == dtype, name

    address = served(algorithm)
    sender = ChunkSender(address, table=algorithm.table().name)
    assert sender.send(records, worker_id=0, policy_version=0, env_steps=env_steps)
    assert sender.flush(10.0)
    sender.close()
    info = BufferClient(address).info()
    assert (info.inserts_total, info.env_steps_total, info.kind) == (len(records["reward"]), env_steps, algorithm.table().kind)

    batch_size = cfg.train.batch_size
    if algorithm.table().kind == "fifo":
        prefetcher = BatchPrefetcher(address, batch_size, 1, 1)
        sample = prefetcher.next(timeout_s=10.0)
        prefetcher.close()
    else:
        sample = BufferClient(address).sample(batch_size)
    assert sample is not None and len(sample) == batch_size
    for name, (shape, dtype) in spec.items():
        assert sample.fields[name].shape == (batch_size, *shape) and sample.fields[name].dtype == dtype, name
    assert (sample.weights is not None) == (algorithm.table().kind == "prioritized")

    learner = algorithm.make_learner(network)
    before = [p.detach().clone() for p in network.parameters()]
    batch = to_batch(sample.fields, sample.keys, sample.weights)
    metrics = learner.update(batch)
    assert metrics and all(np.isfinite(v) for v in metrics.values())
    assert learner.updates == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters(), strict=True))
    if sample.weights is not None:
        assert batch.new_priorities is not None and batch.new_priorities.shape == (batch_size,)
        assert BufferClient(address).update_priorities(batch.keys, batch.new_priorities) == batch_size


@pytest.mark.parametrize(("path", "overrides"), VARIANTS)
def test_learner_state_round_trips_through_a_weights_only_load(path, overrides):
    cfg, algorithm, network = build(path, *overrides)
    records, _ = collect(algorithm, network, rows=cfg.train.batch_size)
    rows = {k: a[: cfg.train.batch_size] for k, a in records.items()}
    learner = algorithm.make_learner(network)
    for _ in range(3):
        learner.update(rows)
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    _, _, other = build(path, *overrides)
    restored = algorithm.make_learner(other)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.updates == 3
    assert learner.update(rows) == pytest.approx(restored.update(rows))


@pytest.mark.parametrize("path", ALGORITHMS)
def test_a_resumed_learner_learns_at_its_own_configs_rate_not_the_saved_one(path):
    """A learner state holds its optimizer's settings: loading it put back the saved learning rate, so
    `--resume algorithm.config.lr=...` changed nothing for IMPALA (DQN sets its rate every update)."""
    _, algorithm, network = build(path, "algorithm.config.lr=0.01")
    saved = algorithm.make_learner(network).state_dict()
    _, slower, other = build(path, "algorithm.config.lr=0.0001")
    restored = slower.make_learner(other)
    restored.load_state_dict(saved)
    assert [group["lr"] for group in restored.optimizer.param_groups] == [0.0001]
    assert restored.optimizer.state_dict()["state"] == saved["optimizer"]["state"]


@pytest.mark.parametrize("path", ALGORITHMS)
def test_an_unknown_key_in_the_algorithm_section_names_file_and_key(path):
    with pytest.raises(ConfigError, match=r"cartpole.yaml: unknown key algorithm.config.no_such_key"):
        make_config(f"algorithm.path={path}", "algorithm.config={no_such_key: 1}")


# DQN's own behaviour, on fixed batches


def fixed_batch(n=32, seed=0, terminated=False):
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, 4)).astype(np.float32)
    return {
        "obs": obs,
        "action": rng.integers(0, 2, n),
        "reward": np.ones(n, np.float32),
        "next_obs": (obs + 0.1).astype(np.float32),
        "terminated": np.full(n, terminated),
        "truncated": np.zeros(n, bool),
    }


def dqn_learner(*overrides, path="trainers.dqn.DQN"):
    _, algorithm, network = build(path, *overrides)
    return algorithm.make_learner(network)


def test_terminal_transitions_regress_to_the_reward_alone():
    learner = dqn_learner("algorithm.config.lr=0.01", "algorithm.config.target_update_every_updates=1")
    batch = fixed_batch(terminated=True)
    for _ in range(300):
        learner.update(batch)
    q = learner.network(torch.as_tensor(batch["obs"])).gather(1, torch.as_tensor(batch["action"]).unsqueeze(1))
    assert q.detach().numpy() == pytest.approx(1.0, abs=0.1)  # reward 1, no bootstrap


@pytest.mark.parametrize("loss", ["huber", "mse"])
@pytest.mark.parametrize(("n_step", "expected"), [(1, 2.0), (2, 1.5)])
def test_non_terminal_transitions_bootstrap_from_the_target_network_with_gamma_to_the_n(n_step, expected, loss):
    # target net predicts 2 everywhere -> TD target = 1 + 0.5**n_step * 2
    learner = dqn_learner(
        "algorithm.config.gamma=0.5",
        f"algorithm.config.n_step={n_step}",
        f"algorithm.config.loss={loss}",
        "algorithm.config.lr=0.01",
        "algorithm.config.target_update_every_updates=1000000",
    )
    with torch.no_grad():
        last = learner.target.net[-1]
        last.weight.zero_()
        last.bias.fill_(2.0)
    batch = fixed_batch()
    for _ in range(300):
        learner.update(batch)
    q = learner.network(torch.as_tensor(batch["obs"])).gather(1, torch.as_tensor(batch["action"]).unsqueeze(1)).detach().numpy()
    assert np.median(q) == pytest.approx(expected, abs=0.05) and q == pytest.approx(expected, abs=0.3)


def test_the_loss_option_changes_the_loss():
    huber, mse = dqn_learner("algorithm.config.loss=huber"), dqn_learner("algorithm.config.loss=mse")
    batch = to_batch({**fixed_batch(), "reward": np.full(32, 10.0, np.float32)})
    assert mse.loss(batch).per_item.mean() > 5 * huber.loss(batch).per_item.mean()  # errors near 10: x^2/2 vs |x| - 1/2


def test_importance_weights_scale_each_items_loss_and_priorities_are_the_td_errors():
    learner = dqn_learner()
    batch = to_batch(fixed_batch(n=4), weights=np.array([0.0, 0.0, 0.0, 1.0], np.float32))
    out = learner.loss(batch)
    metrics = learner.update(batch)
    assert metrics["losses/td_loss"] == pytest.approx(out.per_item[3].item() / 4, rel=1e-4)
    np.testing.assert_allclose(batch.new_priorities, out.priorities.numpy() + 1e-6, rtol=1e-5)


def test_target_network_syncs_every_n_updates():
    learner = dqn_learner("algorithm.config.target_update_every_updates=3")
    first = [p.clone() for p in learner.target.parameters()]
    learner.update(fixed_batch())
    learner.update(fixed_batch())
    assert all(torch.equal(a, b) for a, b in zip(first, learner.target.parameters(), strict=True))
    learner.update(fixed_batch())
    assert all(torch.equal(a, b) for a, b in zip(learner.network.parameters(), learner.target.parameters(), strict=True))


def test_polyak_target_update_moves_the_target_a_fraction_toward_the_online_net():
    learner = dqn_learner("algorithm.config.target_update_every_updates=1", "algorithm.config.target_update_tau=0.25")
    before = [p.clone() for p in learner.target.parameters()]
    learner.update(fixed_batch())
    for old, new, online in zip(before, learner.target.parameters(), learner.network.parameters(), strict=True):
        torch.testing.assert_close(new, old + 0.25 * (online - old))


@pytest.mark.parametrize("end", ["algorithm.config.lr_decay_end_env_steps=1000", "budget.max_env_steps=1000"])
def test_learning_rate_holds_then_decays_linearly_on_the_buffer_env_step_count_then_holds(end):
    learner = dqn_learner(
        "algorithm.config.lr=0.01",
        "algorithm.config.lr_final=0.001",
        "algorithm.config.lr_decay_start_env_steps=200",
        end,
        path="trainers.qr_dqn.QRDQN",
    )
    lrs = []
    for env_steps in (0, 200, 600, 1000, 5000):
        learner.env_steps = env_steps
        metrics = learner.update(fixed_batch())
        lrs.append(learner.optimizer.param_groups[0]["lr"])
        assert metrics["charts/learning_rate"] == lrs[-1]
    np.testing.assert_allclose(lrs, [0.01, 0.01, 0.0055, 0.001, 0.001])


def test_a_decay_that_starts_after_it_ends_is_refused_naming_the_key_and_file():
    with pytest.raises(ConfigError, match=r"cartpole.yaml.*lr_decay_start_env_steps=200000 must come before lr_decay_end_env_steps=150000"):
        make_config(
            "algorithm.config.lr_final=0.001",
            "algorithm.config.lr_decay_start_env_steps=200000",
            "algorithm.config.lr_decay_end_env_steps=150000",
        )


def test_a_budget_that_ends_before_the_decay_starts_keeps_lr_throughout():
    """A short run of a config that decays from 30k (`bash run.sh budget.max_env_steps=4000`) is no error."""
    learner = dqn_learner(
        "algorithm.config.lr=0.01",
        "algorithm.config.lr_final=0.001",
        "algorithm.config.lr_decay_start_env_steps=30000",
        "budget.max_env_steps=4000",
    )
    for env_steps in (0, 4000, 31000, 10**6):  # the actors' lead takes the count past the budget
        learner.env_steps = env_steps
        assert learner.update(fixed_batch())["charts/learning_rate"] == 0.01


def test_learning_rate_is_lr_without_lr_final_even_when_the_resumed_optimizer_state_decayed_it():
    decayed = dqn_learner("algorithm.config.lr=0.01", "algorithm.config.lr_final=0.001")
    decayed.env_steps = 10**9
    decayed.update(fixed_batch())
    learner = dqn_learner("algorithm.config.lr=0.01")
    learner.load_state_dict(decayed.state_dict())
    assert learner.optimizer.param_groups[0]["lr"] == 0.01  # the config's rate from the load on, not the saved one
    assert learner.update(fixed_batch())["charts/learning_rate"] == 0.01
    assert learner.optimizer.param_groups[0]["lr"] == 0.01


def test_qr_dqn_learns_the_quantiles_of_a_random_terminal_reward():
    # kappa = 0: the plain quantile loss, whose minimiser is the exact quantiles (a Huber zone pulls them inward)
    learner = dqn_learner("algorithm.config.lr=0.01", "algorithm.config.kappa=0", path="trainers.qr_dqn.QRDQN")
    rng = np.random.default_rng(0)
    batch = {**fixed_batch(n=256, terminated=True), "obs": np.zeros((256, 4), np.float32), "action": np.zeros(256, np.int64)}
    for _ in range(400):
        learner.update({**batch, "reward": rng.choice([-1.0, 1.0], 256).astype(np.float32)})
    quantiles = learner.network(torch.zeros(1, 4))[0, 0].detach().numpy()  # 8 quantiles of a fair coin of -1 / +1
    np.testing.assert_allclose(np.sort(quantiles), [-1, -1, -1, -1, 1, 1, 1, 1], atol=0.3)


def test_qr_dqn_refuses_a_network_without_a_quantile_axis():
    cfg, algorithm, _ = build("trainers.qr_dqn.QRDQN")
    from models.simple_policy import SimplePolicy

    with pytest.raises(ConfigError, match="QR-DQN needs outputs of shape"):
        algorithm.check_network(SimplePolicy(4, 2, [8]))


def readme_example() -> str:
    """The python block of README.md's "Adding an algorithm" section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Adding an algorithm") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python\n"))]


def test_the_readme_example_algorithm_works_as_written(tmp_path, monkeypatch, served):
    package = tmp_path / "readme_trainers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "naive_q.py").write_text(readme_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert discover_algorithms(package, "readme_trainers") == ["readme_trainers.naive_q.NaiveQ"]
        test_records_match_the_spec_and_round_trip_through_a_real_buffer_then_update("readme_trainers.naive_q.NaiveQ", (), served)
        test_learner_state_round_trips_through_a_weights_only_load("readme_trainers.naive_q.NaiveQ", ())
    finally:
        for name in [m for m in sys.modules if m.startswith("readme_trainers")]:
            del sys.modules[name]


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of a config dataclass, nested sections expanded."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


@pytest.mark.parametrize("path", ["trainers.dqn.DQN", "trainers.qr_dqn.QRDQN", "trainers.impala.IMPALA", None])
def test_the_readme_documents_every_config_key(path):
    from titan_rl.config import Config
    from titan_rl.registry import algorithm_class

    readme = (REPO / "README.md").read_text()
    keys = config_keys(Config) if path is None else config_keys(algorithm_class(path).Config)
    # a key is documented as `section.key`, or by its last part in a row such as `section.host` / `port`
    missing = [k for k in keys if f"`{k}`" not in readme and f"`{k.rsplit('.', 1)[-1]}`" not in readme]
    assert not missing, f"README.md's YAML reference lacks {missing}"
