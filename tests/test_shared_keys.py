"""The keys two services both read, compared on every call between them (titan_rl/shared_keys.py),
against a real buffer service; the three services refusing each other: tests/test_drills.py."""

from __future__ import annotations

import json

import grpc
import pytest

from tests.helpers import DEFAULT_CONFIG, make_config, serving_buffer
from titan_rl.interceptors import HeadersClientInterceptor
from titan_rl.shared_keys import ENV, METADATA_KEY, NOT_SET, shared_values
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc

BUFFER = ("train.min_buffer_size=64",)  # what serving_buffer starts with


def header(role: str, *overrides: str) -> str:
    return json.dumps({"role": role, "values": shared_values(make_config(*overrides), role)})


def info(address: str, metadata_value: str | None) -> buffer_pb2.InfoResponse:
    channel = grpc.insecure_channel(address)
    if metadata_value is not None:
        channel = grpc.intercept_channel(channel, HeadersClientInterceptor([(METADATA_KEY, metadata_value)]))
    try:
        return buffer_pb2_grpc.BufferServiceStub(channel).Info(buffer_pb2.InfoRequest(), timeout=10)
    finally:
        channel.close()


@pytest.fixture
def buffer_of_a_run(monkeypatch):
    monkeypatch.setenv(ENV, header("buffer", *BUFFER))  # as `python -m titan_rl.buffer` sets it
    with serving_buffer() as (address, _):
        yield address


def test_a_caller_that_agrees_on_every_key_both_read_is_served(buffer_of_a_run):
    # the network is the rollout's and the trainer's business, the batch size the buffer's and the trainer's
    assert info(buffer_of_a_run, header("rollout", "policy.kwargs={state_dim: 4, action_dim: 2, hidden_sizes: [64]}")).size == 0
    assert info(buffer_of_a_run, header("trainer", *BUFFER)).size == 0
    assert info(buffer_of_a_run, None).size == 0  # control tools and tests carry none


def test_a_trainer_restarted_with_another_learning_rate_or_a_run_name_of_its_own_is_served(buffer_of_a_run):
    """Keys only the learner reads (LEARNER_ONLY) are not compared, so a trainer restarted by hand with
    another lr goes on with the same buffer and actors; nor is a run name one side leaves unset (a
    trainer fills in its own, `--resume` takes the checkpoint's)."""
    assert info(buffer_of_a_run, header("trainer", *BUFFER, "algorithm.config.lr=0.0001", "algorithm.config.double_q=false")).size == 0
    assert info(buffer_of_a_run, header("trainer", *BUFFER, "logging.run_name=resumed")).size == 0


@pytest.mark.parametrize(
    ("role", "overrides", "named"),
    [
        ("rollout", ["algorithm.config.gamma=0.9"], "algorithm.config.gamma is 0.9 at the rollout, 0.99 at this buffer"),
        ("rollout", ["rollout_server.env_name=CartPole-v0"], 'rollout_server.env_name is "CartPole-v0" at the rollout, "CartPole-v1"'),
        ("trainer", [*BUFFER, "train.batch_size=32"], "train.batch_size is 32 at the trainer, 64 at this buffer"),
        ("trainer", ["train.min_buffer_size=1000"], "train.min_buffer_size is 1000 at the trainer, 64 at this buffer"),
        ("trainer", [*BUFFER, "train.learners=2"], "train.learners is 2 at the trainer, 1 at this buffer"),
        ("trainer", [*BUFFER, "budget.max_env_steps=200000"], "budget.max_env_steps is 200000 at the trainer, 100000 at this buffer"),
    ],
)
def test_a_caller_started_with_another_value_of_a_key_both_read_is_refused_naming_it(buffer_of_a_run, role, overrides, named):
    with pytest.raises(grpc.RpcError) as refused:
        info(buffer_of_a_run, header(role, *overrides))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert named in refused.value.details() and refused.value.details().startswith("/titan_rl.v1.BufferService/Info: ")


def test_a_key_one_side_lacks_is_named_as_not_set(buffer_of_a_run):
    """A caller of another version, whose algorithm has a key this one's lacks."""
    values = json.loads(header("rollout"))
    values["values"]["algorithm.config.sigma"] = 0.5
    with pytest.raises(grpc.RpcError) as refused:
        info(buffer_of_a_run, json.dumps(values))
    assert "algorithm.config.sigma is 0.5 at the rollout, (not set) at this buffer" in refused.value.details()


@pytest.mark.parametrize("value", ["not json", "[1, 2]", '{"role": "rollout"}', '{"role": "rollout", "values": 3}'])
def test_a_header_that_is_not_a_services_is_invalid_argument(buffer_of_a_run, value):
    with pytest.raises(grpc.RpcError) as refused:
        info(buffer_of_a_run, value)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and METADATA_KEY in refused.value.details()


def test_a_buffer_of_a_named_run_refuses_a_trainer_of_another_or_of_none(monkeypatch, tmp_path):
    """A buffer that keeps run `one`'s replay: a trainer of another run would learn from it."""
    run = (*BUFFER, "logging.run_name=one", f"logging.run_dir={tmp_path}")
    monkeypatch.setenv(ENV, header("buffer", *run))
    with serving_buffer(DEFAULT_CONFIG, *run[1:]) as (address, _):
        assert info(address, header("trainer", *run)).size == 0
        for other, shown in (("two", '"two"'), ("''", '""')):
            with pytest.raises(grpc.RpcError) as refused:
                info(address, header("trainer", *BUFFER, f"logging.run_name={other}"))
            assert f'logging.run_name is {shown} at the trainer, "one" at this buffer' in refused.value.details()


def test_a_network_keyword_at_its_default_on_one_host_and_left_out_on_another_agrees():
    """`hidden_sizes: [64, 64]` spelled out in one YAML and left to SimplePolicy's default in another
    build the same network; they were refused as "(not set)"."""
    from titan_rl.shared_keys import differences

    spelled = shared_values(make_config("policy.kwargs={state_dim: 4, action_dim: 2, hidden_sizes: [64, 64], num_atoms: 1}"), "trainer")
    left_out = shared_values(make_config("policy.kwargs={state_dim: 4, action_dim: 2}"), "rollout")
    assert differences(spelled, left_out, "trainer") == []
    wider = shared_values(make_config("policy.kwargs={state_dim: 4, action_dim: 2, hidden_sizes: [128, 128]}"), "rollout")
    assert differences(spelled, wider, "trainer") == [("policy.kwargs.hidden_sizes", [128, 128], NOT_SET)]


def test_a_network_default_that_reads_differently_in_every_process_is_never_compared():
    """A default that is a function (`activation=F.relu`) is "<function relu at 0x...>" as text, its
    address another in every process: two services with one YAML refused each other."""
    import subprocess
    import sys

    script = (
        "import json; from tests.helpers import make_config; from titan_rl.shared_keys import shared_values; "
        "print(json.dumps(shared_values(make_config('policy.path=tests.plugins.ActivationPolicy', "
        "'policy.kwargs={state_dim: 4, action_dim: 2}'), 'rollout'), sort_keys=True))"
    )
    runs = [
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True).stdout for _ in range(2)
    ]
    assert runs[0] == runs[1] and "0x" not in runs[0], runs
