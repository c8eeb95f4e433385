"""The launcher's checks before any process starts: a mistake in the config names the file and the
key, whatever part of the run it would have broken (a service at start, or one after it was up)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.helpers import DEFAULT_CONFIG
from titan_rl.auth import TOKEN_ENV
from titan_rl.errors import TitanError
from titan_rl.launcher import Launcher


def launcher(tmp_path: Path, *overrides: str) -> Launcher:
    files = [f"logging.run_dir={tmp_path}/runs", f"logging.checkpoint_path={tmp_path}/checkpoint.pth"]
    return Launcher(str(DEFAULT_CONFIG), [*files, *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["policy.kwargs.hidden_sizes=[-1]"], "policy: cannot build models.simple_policy.SimplePolicy with kwargs"),
        (["policy.path=torch.nn.Identity"], "policy.path='torch.nn.Identity' has no trainable parameters"),
        (["rollout_server.env_name=nosuchmod:Foo-v0"], "rollout_server.env_name='nosuchmod:Foo-v0': No module named 'nosuchmod'"),
        (["buffer_server.host=192.0.2.1"], "cannot listen on buffer_server.host='192.0.2.1' buffer_server.port=0"),
        (["buffer_server.host=nosuch.invalid"], "cannot listen on buffer_server.host='nosuch.invalid'"),
        (["buffer_server.host='::1'"], "buffer_server.host='::1': write an IPv6 address in brackets, as gRPC reads it: [::1]"),
        (["logging.run_dir=/dev/null/x"], "logging.run_dir='/dev/null/x': /dev/null is not a folder"),
        (["logging.run_dir=/proc/x"], "logging.run_dir='/proc/x': /proc is not writable"),  # os.access says yes to root
        (["logging.checkpoint_path=/dev/null/x.pth"], "logging.checkpoint_path='/dev/null/x.pth': /dev/null is not a folder"),
        (["durability.snapshot_path=/dev/null/s.npz"], "durability.snapshot_path='/dev/null/s.npz': /dev/null is not a folder"),
        (["buffer_server.capacity_items=100000000000000"], "(buffer_server.capacity_items), more than this machine's"),
        # a network or an algorithm plugin that does not fit: these once started the run, which then never trained
        # (a restart loop of its workers until the wall-clock budget), or raised a traceback
        (["policy.kwargs.action_dim=3"], "DQN reads action values of shape [3] per observation, but rollout_server.env_name="),
        (["policy.path=models.actor_critic.ActorCriticMLP"], "policy.path='models.actor_critic.ActorCriticMLP' does not fit DQN"),
        (["algorithm.path=tests.plugins.WritesAnUndeclaredField"], "record_spec(): value: is not in the table's signature"),
        (["algorithm.path=tests.plugins.DeclaresAFieldItNeverWrites"], "do not fit its record_spec(): value: missing"),
        (["algorithm.path=tests.plugins.WritesActionsOfAnotherDtype"], "action: got rows of shape () int32, the table stores"),
        (["algorithm.path=tests.plugins.NamesAnExtraLikeAField"], "extras: reward already names a field of the records (obs, "),
    ],
)
def test_a_config_that_would_break_a_service_fails_the_launch_naming_file_and_key(tmp_path, overrides, message):
    with pytest.raises(TitanError) as e:
        launcher(tmp_path, *overrides)
    assert str(e.value).startswith(f"{DEFAULT_CONFIG}: ") and message in str(e.value)
    assert not (tmp_path / "runs").exists(), "nothing is created before the checks pass"


def test_a_network_that_acts_only_in_eval_mode_passes_as_the_workers_run_it(tmp_path):
    """The dry run acted with the network in training mode, where batch norm refuses one env's observation."""
    launcher(tmp_path, "policy.path=tests.plugins.BatchNormPolicy", "rollout_server.envs_per_worker=1")


def test_an_algorithm_that_overrides_only_greedy_actions_is_not_held_to_its_bases_action_values(tmp_path):
    launcher(tmp_path, "algorithm.path=tests.plugins.ActsOnTheMeanOfAtoms", "policy.kwargs.num_atoms=4")


def test_an_off_policy_actor_that_records_extras_has_them_in_its_transitions(tmp_path):
    """The n-step adder dropped the actor's extras: an off-policy plugin could not record one."""
    import torch

    from tests.helpers import make_config
    from titan_rl.dry_run import first_records
    from titan_rl.registry import build_algorithm, build_policy

    launcher(tmp_path, "algorithm.path=tests.plugins.RecordsItsActionValue")  # the launch's checks pass it
    cfg = make_config("algorithm.path=tests.plugins.RecordsItsActionValue", "algorithm.config.epsilon_start=0")
    algorithm, network = build_algorithm(cfg), build_policy(cfg).eval()
    records = first_records(cfg, algorithm, network)
    with torch.no_grad():
        q = network(torch.as_tensor(records["obs"]))
    expected = q[torch.arange(len(q)), torch.as_tensor(records["action"])].numpy()
    assert records["q_taken"].dtype == "float32" and records["q_taken"] == pytest.approx(expected)


def test_qr_dqn_atoms_out_of_range_is_a_config_error(tmp_path):
    with pytest.raises(TitanError, match="num_atoms must be >= 1, got 0"):
        Launcher("config/cartpole_qrdqn.yaml", [f"logging.run_dir={tmp_path}/runs", "policy.kwargs.num_atoms=0"])


def test_two_services_on_one_port_or_a_port_in_use_are_refused(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TitanError, match=f"cannot listen on trainer_server.host='127.0.0.1' trainer_server.port={port}: "):
            launcher(tmp_path, f"trainer_server.port={port}")
    with pytest.raises(TitanError, match=f"trainer_server.port={port}: the port of buffer_server too"):
        launcher(tmp_path, f"buffer_server.port={port}", f"trainer_server.port={port}")


def test_a_token_in_the_environment_that_grpc_cannot_carry_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "naïve")
    with pytest.raises(TitanError, match=f"\\${TOKEN_ENV} must be 1 to 4096 printable ASCII"):
        launcher(tmp_path)


def test_a_good_config_passes_and_creates_nothing_yet(tmp_path):
    launched = launcher(tmp_path)
    assert launched.cfg.buffer_server.port > 0 and not (tmp_path / "runs").exists()


def test_a_buffer_started_on_its_own_names_the_capacity_its_table_cannot_get():
    from tests.helpers import make_config
    from titan_rl.buffer.service import tables_for
    from titan_rl.errors import ConfigError
    from titan_rl.registry import build_algorithm

    algorithm = build_algorithm(make_config("buffer_server.capacity_items=100000000000000"))
    with pytest.raises(ConfigError, match=r"GiB \(buffer_server.capacity_items\), more than this machine's [\d,.]+ GiB"):
        tables_for(algorithm, seed=0)


CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


@pytest.fixture
def cgroup_of_1_gib(tmp_path: Path):
    """A real cgroup (v1's memory controller) capped at 1 GiB, removed after the test; skipped where
    this user cannot make one (not root, or cgroup v2 only: its controllers must be delegated)."""
    folder = CGROUP_V1_MEMORY / f"titan-test-{tmp_path.name}"
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(2**30))
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup here: {e}")
    yield folder
    folder.rmdir()


def test_a_buffer_in_a_container_refuses_a_table_larger_than_its_memory_limit(cgroup_of_1_gib: Path):
    """A table that fits the machine but not the pod's memory limit started, and the kernel killed the
    buffer once it had filled 1 GiB of it (numpy's zeros take pages only as they are written)."""
    import subprocess
    import sys

    from tests.helpers import REPO

    buffer = f"exec {sys.executable} -m titan_rl.buffer --port 0 buffer_server.capacity_items=50000000"  # ~2.5 GiB of CartPole records
    result = subprocess.run(
        ["sh", "-c", f"echo $$ > {cgroup_of_1_gib}/cgroup.procs && {buffer}"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "(buffer_server.capacity_items), more than the 1.0 GiB this process's cgroup allows" in result.stderr, result.stderr


def test_the_memory_limit_is_the_least_of_the_cgroups_above_this_process(tmp_path: Path):
    """cgroup v2's layout (one hierarchy, `memory.max`, "max" for none) as the kernel writes it, read from files laid out the same way."""
    from titan_rl.memory import cgroup_memory_limits_bytes

    (pod := tmp_path / "kubepods" / "pod1" / "app").mkdir(parents=True)
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "kubepods" / "memory.max").write_text("8589934592\n")
    (tmp_path / "kubepods" / "pod1" / "memory.max").write_text("2147483648\n")
    (pod / "memory.max").write_text("max\n")
    (proc_cgroup := tmp_path / "cgroup").write_text("0::/kubepods/pod1/app\n")
    assert sorted(cgroup_memory_limits_bytes(proc_cgroup, tmp_path)) == [2**31, 2**33]
    proc_cgroup.write_text("0::/\n")  # in the container's own cgroup namespace: its limit at the root
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert cgroup_memory_limits_bytes(proc_cgroup, tmp_path) == [2**30]
    assert cgroup_memory_limits_bytes(tmp_path / "missing", tmp_path) == []


def test_a_token_with_spaces_inside_is_a_token(tmp_path):
    from tests.helpers import make_config

    assert make_config("security.token='pass phrase'").security.token == "pass phrase"


def test_an_ipv6_host_in_brackets_is_probed_as_grpc_binds_it(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    assert launcher(tmp_path, "buffer_server.host='[::1]'").cfg.buffer_server.dial_address.startswith("[::1]:")


def _last_checkpoint_of(tmp_path: Path, config: str, run_name: str, *overrides: str) -> None:
    """`checkpoint_last.pth` of a run of `config`, written the way the trainer writes it."""
    from titan_rl.checkpoint import last_path, save_checkpoint
    from titan_rl.config import load_config
    from titan_rl.registry import build_algorithm, build_policy

    cfg = load_config(config, [f"logging.run_name={run_name}", *overrides])
    learner = build_algorithm(cfg).make_learner(build_policy(cfg))
    counters = {"updates": 10, "env_steps": 1000, "policy_version": 1, "wall_s": 1.0}
    save_checkpoint(last_path(tmp_path / "checkpoint.pth"), cfg, learner.state_dict(), counters, None)


def test_resume_with_a_config_other_than_the_runs_is_refused_before_anything_starts(tmp_path):
    """Before, `bash run.sh --resume` (the default CartPole config) after an Acrobot run started every
    service, then failed in the trainer with torch's size mismatch."""
    _last_checkpoint_of(tmp_path, "config/acrobot.yaml", "acro")
    files = [f"logging.run_dir={tmp_path}/runs", f"logging.checkpoint_path={tmp_path}/checkpoint.pth"]
    with pytest.raises(TitanError, match=r"--resume: .*checkpoint_last.pth holds run 'acro' with rollout_server.env_name='Acrobot-v1', "):
        Launcher(str(DEFAULT_CONFIG), files, resume=True)
    with pytest.raises(TitanError, match=r"cannot resume run 'acro' from .*checkpoint_last.pth: .*size mismatch"):
        Launcher("config/acrobot.yaml", [*files, "policy.kwargs.hidden_sizes=[32]"], resume=True)
    assert not (tmp_path / "runs").exists()
    resumed = Launcher("config/acrobot.yaml", files, resume=True)
    assert resumed.cfg.logging.run_name == "acro"


def test_resume_of_a_run_whose_budget_is_spent_is_refused_naming_the_budget(tmp_path):
    """It started every service, and the trainer ended the run at once."""
    _last_checkpoint_of(tmp_path, "config/acrobot.yaml", "acro")  # 1,000 env steps, 1 s
    files = [f"logging.run_dir={tmp_path}/runs", f"logging.checkpoint_path={tmp_path}/checkpoint.pth"]
    with pytest.raises(TitanError, match=r"--resume: run 'acro' is at 1,000 env steps already, budget.max_env_steps=1000: set a larger"):
        Launcher("config/acrobot.yaml", [*files, "budget.max_env_steps=1000"], resume=True)
    with pytest.raises(TitanError, match=r"--resume: run 'acro' has trained for 1s already, budget.max_wall_s=0.5"):
        Launcher("config/acrobot.yaml", [*files, "budget.max_wall_s=0.5"], resume=True)
    assert Launcher("config/acrobot.yaml", [*files, "budget.max_env_steps=1001"], resume=True).cfg.logging.run_name == "acro"


def test_a_trainer_started_on_its_own_with_another_config_refuses_the_runs_checkpoint(tmp_path):
    """`python -m titan_rl.trainer` (a Kubernetes restart after the ConfigMap changed) resumes without
    the launcher's check: the same check runs where it loads the run's learner."""
    from titan_rl.config import load_config
    from titan_rl.registry import build_algorithm, build_policy
    from titan_rl.trainer.resume import resume_learner

    _last_checkpoint_of(tmp_path, "config/acrobot.yaml", "acro")
    cfg = load_config(DEFAULT_CONFIG, ["logging.run_name=acro", f"logging.checkpoint_path={tmp_path}/checkpoint.pth"])
    algorithm = build_algorithm(cfg)
    with pytest.raises(TitanError, match=r"holds run 'acro' with rollout_server.env_name='Acrobot-v1', not 'CartPole-v1'"):
        resume_learner(cfg, algorithm.make_learner(build_policy(cfg)))


def test_the_summary_shown_is_only_one_this_launch_wrote(tmp_path):
    """A resumed run's folder holds its earlier part's summary.json: when the trainer ends without
    writing one, that old summary was printed as this launch's. Told apart by the file's version,
    not by the clock (a file server may set the time of a new one in the past)."""
    import json
    import os

    from titan_rl.launcher import file_version, summary_text

    summary = {"stop_reason": "budget", "env_steps": 4000, "updates": 900, "best_eval_return": 120.0}
    summary |= {"checkpoint": "c", "last_checkpoint": "l"}
    path = tmp_path / "summary.json"
    assert summary_text(tmp_path, file_version(path), 3.0).startswith("no summary: training did not finish")
    path.write_text(json.dumps(summary))
    earlier = file_version(path)
    assert summary_text(tmp_path, earlier, 3.0).startswith("no summary: training did not finish")
    path.write_text(json.dumps(summary))
    os.utime(path, ns=(earlier[1] - 120 * 10**9, earlier[1] - 120 * 10**9))  # written since, with an older time
    assert summary_text(tmp_path, earlier, 3.0).startswith("done: budget\n  env steps 4,000  updates 900  wall 3.0s")
    assert summary_text(tmp_path, None, 3.0).startswith("done: budget")
    path.write_text(json.dumps(summary)[:40])  # cut short: a traceback at the end of the run
    assert summary_text(tmp_path, None, 3.0).startswith(f"no summary: {path} cannot be read (JSONDecodeError: ")
    path.write_text("[1, 2]")
    assert summary_text(tmp_path, None, 3.0).startswith(f"no summary: {path} cannot be read (TypeError: ")
