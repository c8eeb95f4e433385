"""Fuzzing every RPC of every service, on real servers on free 127.0.0.1 ports.

Two kinds of input: random bytes sent as a request's serialized form, and well-formed messages
with hostile values (wrong dtypes, shapes that lie about their data, sizes that would allocate
terabytes, NaN, actions outside the action space, bool bytes other than 0/1, paths out of the run).
Whatever comes in, a service answers with a status that names the field it refuses
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...). UNKNOWN means a servicer raised and
INTERNAL that gRPC could not decode the request: neither may reach a client. A refused request
stores nothing and the service keeps serving. The plain tests at the end are the bugs this fuzzing
found, each kept as it first failed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import make_config, serving_buffer, transitions
from titan_rl import wire
from titan_rl.buffer.table import Table
from titan_rl.rpc import make_channel, make_server, set_serving
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc, common_pb2, rollout_pb2, rollout_pb2_grpc, trainer_pb2, trainer_pb2_grpc

T = TypeVar("T")
OK = grpc.StatusCode.OK
TIMEOUT_S = 10.0  # every call has one; a call that must wait (a watch for a version to come) gets WAIT_S
WAIT_S = 0.1
# A few dozen examples per property keep the file within ~40 s on two slow cores. Each run draws new ones;
# on CI hypothesis derandomizes, so every CI run tries the same. `request` only looks up module-scoped servers.
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=15)

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
DTYPES = st.sampled_from(["int64", "int32", "uint8", "int8", "float64", "float32", "float16", "bool", "", "object", "<f4", "U3"])
DIMS = st.one_of(st.integers(-2, 6), st.sampled_from([2**31, 2**40, 2**62, -(2**63)]))
SHAPES = st.one_of(st.lists(DIMS, max_size=4), st.builds(lambda n, dim: [dim] * n, st.sampled_from([33, 64, 65]), st.sampled_from([0, 1])))
# Batch sizes: small ones, and edges: over the capacity (1000), rows that would take gigabytes, int32's ends.
SIZES = st.one_of(st.integers(-2, 40), st.sampled_from([-(2**31), 1000, 1001, 5000, 2**23, 2**31 - 1]))
NUM_BATCHES = st.one_of(st.integers(-2, 40), st.sampled_from([-(2**31), 5000, 2**23, 2**31 - 1]))
TABLES = st.one_of(st.just(""), st.just("default"), st.text(max_size=8))
CREDITS = st.builds(buffer_pb2.SampleStreamRequest, batch_size=SIZES, num_batches=NUM_BATCHES, table=TABLES, min_policy_version=INT64)


# ---- servers ---------------------------------------------------------------------------------------------------


@dataclass
class Buffer:
    address: str
    table: Table  # the server's own table, read to check what was stored
    stub: buffer_pb2_grpc.BufferServiceStub
    channel: grpc.Channel


@contextlib.contextmanager
def _buffer(config: str, *overrides: str) -> Iterator[Buffer]:
    """A buffer service started as `python -m titan_rl.buffer` starts it, its one table holding 1000 items at most."""
    with serving_buffer(config, *overrides) as (address, table):
        channel = make_channel(address)
        try:
            yield Buffer(address, table, buffer_pb2_grpc.BufferServiceStub(channel), channel)
        finally:
            channel.close()


@pytest.fixture(scope="module")
def uniform() -> Iterator[Buffer]:
    """DQN's uniform replay table, full."""
    with _buffer("config/cartpole.yaml") as buffer:
        buffer.table.insert_fields(transitions(1000))
        yield buffer


@pytest.fixture(scope="module")
def prioritized() -> Iterator[Buffer]:
    """DQN's prioritized replay table, full."""
    with _buffer("config/cartpole.yaml", "algorithm.config.replay=prioritized") as buffer:
        buffer.table.insert_fields(transitions(1000))
        yield buffer


@pytest.fixture(scope="module")
def fifo() -> Iterator[Buffer]:
    """IMPALA's queue of 32 segments of 20 steps."""
    with _buffer("config/cartpole_impala.yaml") as buffer:
        yield buffer


@pytest.fixture(scope="module", params=["uniform", "prioritized", "fifo"])
def any_buffer(request: pytest.FixtureRequest) -> Buffer:
    """Each kind of table in turn."""
    return request.getfixturevalue(request.param)


@dataclass
class Trainer:
    stub: trainer_pb2_grpc.TrainerServiceStub
    channel: grpc.Channel
    run: Path  # holds logs/ and checkpoints/, nothing else
    epoch: int  # of its policy store: a watch of another epoch gets the current weights at once


@pytest.fixture(scope="module")
def trainer(uniform: Buffer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trainer]:
    """The trainer's servicer over a real loop, policy store, evaluator and batches from `uniform`, as in test_trainer_service."""
    from titan_rl.clients.buffer import BatchPrefetcher
    from titan_rl.evaluation import Evaluator
    from titan_rl.metrics import MetricsLogger
    from titan_rl.registry import build_algorithm, build_policy
    from titan_rl.trainer.loop import TrainingLoop
    from titan_rl.trainer.policy_store import PolicyStore
    from titan_rl.trainer.service import TrainerServicer

    run = tmp_path_factory.mktemp("fuzzed-trainer")
    checkpoint = run / "checkpoints" / "ck.pth"
    cfg = make_config("logging.console=false", f"logging.run_dir={run / 'logs'}", f"logging.checkpoint_path={checkpoint}")
    algorithm, policy = build_algorithm(cfg), build_policy(cfg)
    store = PolicyStore()
    batches = BatchPrefetcher(uniform.address, cfg.train.batch_size)
    evaluator = Evaluator(cfg, cfg.eval.episodes)
    logger = MetricsLogger(cfg, run / "logs", "fuzz")
    loop = TrainingLoop(cfg, algorithm.make_learner(policy), batches, store, logger, evaluator)
    server, port, health = make_server("127.0.0.1", 0)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(loop, store), server)
    store.publish(policy.state_dict(), env_steps=0)
    server.start()
    set_serving(health, [trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name])
    channel = make_channel(f"127.0.0.1:{port}")
    try:
        yield Trainer(trainer_pb2_grpc.TrainerServiceStub(channel), channel, run, store.epoch)
    finally:
        channel.close()
        store.close()
        evaluator.close()
        batches.close()
        logger.close()
        server.stop(None).wait()


@pytest.fixture(scope="module")
def rollout() -> Iterator[grpc.Channel]:
    """A channel to the rollout servicer over real statistics with one worker's report (its workers would need a trainer)."""
    from titan_rl.rollout.service import RolloutServicer
    from titan_rl.rollout.stats import TrajectoryStats, WorkerReport

    stats = TrajectoryStats(2)
    stats.record(WorkerReport(0, 100, {"epsilon": 0.5}, 3, [10.0, 20.0], [10, 20]))
    server, port, health = make_server("127.0.0.1", 0)
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(stats), server)
    server.start()
    set_serving(health, [rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name])
    channel = make_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        server.stop(None).wait()


# ---- what every answer must be -----------------------------------------------------------------------------------


def _outcome(call: Callable[[], T]) -> tuple[grpc.StatusCode, str, T | None]:
    """(status, details, result) of `call`: OK and its result, or the error's status and details."""
    try:
        return OK, "", call()
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


def _assert_answer(code: grpc.StatusCode, details: str, allowed: Iterable[grpc.StatusCode], names: Iterable[str]) -> None:
    """OK or a status in `allowed` (never UNKNOWN or INTERNAL); a refusal names one of `names`, the request's fields."""
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), f"{code.name}: {details}"
    assert code == OK or code in set(allowed), f"{code.name}: {details}"
    if code != OK:
        assert any(name in details for name in names), f"{code.name} names none of {list(names)}: {details!r}"


def _counts(buffer: Buffer) -> tuple[int, int]:
    """(inserts_total, env_steps_total) from an Info call, which also shows the buffer still serves."""
    info = buffer.stub.Info(buffer_pb2.InfoRequest(), timeout=TIMEOUT_S)
    return info.inserts_total, info.env_steps_total


def _assert_values_fit(table: Table, records: np.ndarray) -> None:
    """Every float finite, every bool byte 0 or 1, every bounded field within its bounds: checked here, not by the buffer's code."""
    for name, values in table.layout.views(records).items():
        if values.dtype.kind == "f":
            assert np.isfinite(values).all(), f"{name}: a stored value is nan or inf"
        if values.dtype.kind == "b":
            assert values.view(np.uint8).max(initial=0) <= 1, f"{name}: a stored bool byte is not 0 or 1"
        if name in table.spec.value_bounds and values.size:
            low, high = table.spec.value_bounds[name]
            assert low <= values.min() and values.max() <= high, f"{name}: a stored value is outside [{low}, {high}]"


def _assert_stored_values_fit(table: Table) -> None:
    _assert_values_fit(table, table.storage.gather(np.arange(table.storage.size)))


def _valid_records(table: Table, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`rows` records that fit `table`'s signature and value bounds."""
    fields = {}
    for name, (shape, dtype) in table.storage.spec.items():
        size = (rows, *shape)
        low, high = table.spec.value_bounds.get(name, (-100, 100))
        if dtype.kind == "b":
            values = rng.random(size) < 0.5
        elif dtype.kind in "iu":
            values = rng.integers(int(low), int(high), size, endpoint=True)
        else:
            values = np.clip(rng.standard_normal(size), low, high)
        fields[name] = values.astype(dtype)
    return fields


# ---- random bytes as any request ---------------------------------------------------------------------------------


SERVICES = {"BufferService": buffer_pb2, "TrainerService": trainer_pb2, "RolloutService": rollout_pb2}
METHODS = {f"{service}.{m.name}": m for service, module in SERVICES.items() for m in module.DESCRIPTOR.services_by_name[service].methods}
STOP = METHODS.pop("TrainerService.Stop")  # fuzzed last, on its own: a stopped trainer's loop would end at its next step


def _raw_call(channel: grpc.Channel, method: MethodDescriptor, data: bytes, timeout_s: float = TIMEOUT_S) -> Any:
    """Send `data` as the serialized request of `method` (no serializer on the way out, none on the way back)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.client_streaming:  # Add, SampleStream: this one request, then the end of the stream
        return list(channel.stream_stream(path)(iter([data]), timeout=timeout_s))
    if method.server_streaming:  # WatchPolicy: the first answer is enough
        call = channel.unary_stream(path)(data, timeout=timeout_s)
        try:
            return next(call)
        finally:
            call.cancel()
    return channel.unary_unary(path)(data, timeout=timeout_s)


def _decoded(method: MethodDescriptor, data: bytes) -> Message | None:
    """`data` parsed as `method`'s request, or None where it does not parse."""
    try:
        return getattr(SERVICES[method.containing_service.name], method.input_type.name).FromString(data)
    except DecodeError:
        return None


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
@FUZZ
@given(data=st.binary(max_size=120))
def test_random_bytes_as_any_request_are_refused_by_name_and_store_nothing(method, data, uniform, trainer, rollout):
    channels = {"BufferService": uniform.channel, "TrainerService": trainer.channel, "RolloutService": rollout}
    channel = channels[method.containing_service.name]
    request = _decoded(method, data)
    # a watch of this trainer's epoch waits for a version to come; one of another epoch gets the current weights
    waits = method.name == "WatchPolicy" and request is not None and request.epoch == trainer.epoch and request.after_version >= 0
    before = _counts(uniform)
    code, details, _ = _outcome(lambda: _raw_call(channel, method, data, WAIT_S if waits else TIMEOUT_S))
    if request is None:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request: "), f"{code.name}: {details}"
    elif waits:
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, f"{code.name}: {details}"
    else:
        allowed = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION]
        _assert_answer(code, details, allowed, [f.name for f in method.input_type.fields])
    if code != OK:
        assert _counts(uniform) == before, f"a refused {method.name} stored something"
    _assert_stored_values_fit(uniform.table)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# ---- buffer: Add -------------------------------------------------------------------------------------------------

LAYOUT_CHANGES = ("dtype", "shape", "offset", "record_size", "drop_field", "add_field", "no_layout", "rows", "data", "empty", "no_chunk")
CHANGES = (*LAYOUT_CHANGES, "env_steps", "table", "episodes")


def _poke(draw: st.DrawFn, table: Table, data: np.ndarray) -> None:
    """Write one value the table must refuse into `data` ([rows, record_size] bytes): nan or inf in a
    float field, a bool byte other than 0 or 1, or a value outside a bounded field's range."""
    bounds = table.spec.value_bounds
    names = sorted(name for name, slot in table.layout.slots.items() if slot.dtype.kind in "fb" or name in bounds)
    slot = table.layout.slots[name := draw(st.sampled_from(names))]
    dtype = slot.dtype
    if dtype.kind == "b":
        value = np.uint8(draw(st.integers(2, 255)))
    elif name in bounds and dtype.kind in "iu":
        low, high = int(bounds[name][0]), int(bounds[name][1])
        value = dtype.type(draw(st.one_of(st.integers(-(2**63), low - 1), st.integers(high + 1, 2**63 - 1))))
    elif name in bounds and math.isfinite(bounds[name][1]):  # a float with an upper bound: log_prob <= 0
        value = dtype.type(draw(st.floats(min_value=bounds[name][1], exclude_min=True, width=8 * dtype.itemsize)))
    else:
        value = dtype.type(draw(st.sampled_from([np.nan, np.inf, -np.inf])))
    row, element = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, slot.nbytes // dtype.itemsize - 1))
    start = slot.offset + element * dtype.itemsize
    data[row, start : start + dtype.itemsize] = np.frombuffer(np.asarray(value).tobytes(), np.uint8)


def _change(draw: st.DrawFn, request: buffer_pb2.AddRequest, change: str) -> None:
    """Apply one hostile `change` to `request`."""
    records = request.chunk.records
    fields = records.layout.fields
    if change in ("dtype", "shape", "offset", "drop_field"):
        field = fields[draw(st.integers(0, len(fields) - 1))] if len(fields) else fields.add(name="obs")
    if change == "dtype":
        field.dtype = draw(DTYPES)
    elif change == "shape":
        field.shape[:] = draw(SHAPES)
    elif change == "offset":
        field.offset = draw(INT32)
    elif change == "record_size":
        records.layout.record_size = draw(INT32)
    elif change == "drop_field":
        fields.remove(field)
    elif change == "add_field":
        names = [f.name for f in fields]  # none left after an earlier change took the layout away
        name = draw(st.one_of(st.sampled_from(names), st.text(max_size=6)) if names else st.text(max_size=6))
        fields.add(name=name, dtype=draw(DTYPES), shape=draw(SHAPES), offset=draw(INT32))
    elif change == "no_layout":
        records.ClearField("layout")
    elif change == "rows":
        records.rows = draw(INT64)
    elif change == "data":
        cut = draw(st.integers(0, len(records.data)))
        records.data = records.data[:cut] + draw(st.binary(max_size=64))
    elif change == "empty":  # no records, the layout kept: it must be checked all the same
        records.rows, records.data = 0, b""
    elif change == "no_chunk":
        request.ClearField("chunk")
    elif change == "env_steps":  # accepted ones small: the shared tables' counts must stay far from 2**63 (tested on its own)
        request.chunk.env_steps = draw(st.one_of(st.integers(-(2**63), 0), st.integers(1, 2**32)))
    elif change == "table":
        request.table = draw(TABLES)
    elif change == "episodes":  # the episodes finished in the chunk's steps and its replica: any values
        request.chunk.episode_returns[:] = draw(st.lists(st.floats(width=64), max_size=3))
        request.chunk.episode_lengths[:] = draw(st.lists(st.one_of(INT64, st.integers(1, 500)), max_size=3))
        request.chunk.replica_id = draw(INT32)


def _episodes_fit(chunk: common_pb2.RecordChunk) -> bool:
    """What the buffer must check before it counts a chunk's episodes (common.proto)."""
    returns, lengths = list(chunk.episode_returns), list(chunk.episode_lengths)
    return len(returns) == len(lengths) and all(np.isfinite(returns)) and all(n >= 1 for n in lengths) and chunk.replica_id >= 0


@st.composite
def hostile_adds(draw: st.DrawFn, table: Table) -> tuple[buffer_pb2.AddRequest, bool]:
    """A chunk of valid records for `table`, maybe with a bad value poked into its bytes, then up to two
    hostile changes to its layout, sizes, counts or table. Returns the request and whether it must be
    refused: a poked value must be, whatever happened to the chunk but a change of its env steps or table."""
    rows = draw(st.integers(0, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    chunk = wire.encode_chunk(_valid_records(table, rows, rng), draw(INT32), draw(INT64), draw(st.integers(rows, rows * 40)))
    poked = rows > 0 and draw(st.booleans())
    if poked:
        data = np.frombuffer(bytearray(chunk.records.data), np.uint8).reshape(rows, -1)
        _poke(draw, table, data)
        chunk.records.data = data.tobytes()
    request = buffer_pb2.AddRequest(chunk=chunk, ack=draw(st.booleans()))
    changes = draw(st.lists(st.sampled_from(CHANGES), max_size=2))
    for change in changes:
        _change(draw, request, change)
    return request, poked and not set(changes) & set(LAYOUT_CHANGES)


def _drain(table: Table) -> None:
    """Hand out every unread item of a queue, so the next Add finds room."""
    if unread := table.info().size:
        table.sample(unread)


@pytest.mark.parametrize("name", ["uniform", "fifo"])
@FUZZ
@given(data=st.data(), prefix_rows=st.integers(0, 4))
def test_a_hostile_chunk_is_refused_by_name_and_nothing_of_it_is_stored(name, data, prefix_rows, request):
    """A valid chunk first on the same stream (stored: it came before), then the hostile one."""
    buffer: Buffer = request.getfixturevalue(name)
    hostile, must_refuse = data.draw(hostile_adds(buffer.table))
    prefix = wire.encode_chunk(_valid_records(buffer.table, prefix_rows, np.random.default_rng(prefix_rows)))
    inserts, env_steps = _counts(buffer)
    episodes = buffer.stub.Sources(buffer_pb2.SourcesRequest(), timeout=TIMEOUT_S).episodes
    stream = [buffer_pb2.AddRequest(chunk=prefix, ack=True), hostile]
    code, details, _ = _outcome(lambda: list(buffer.stub.Add(iter(stream), timeout=TIMEOUT_S)))
    unknown_table = hostile.table not in ("", "default")
    _assert_answer(code, details, [grpc.StatusCode.NOT_FOUND if unknown_table else grpc.StatusCode.INVALID_ARGUMENT], ["chunk", "table"])
    if must_refuse or unknown_table:
        assert code != OK, "a poked value or an unknown table was accepted"
    if code == OK:  # the chunk's env steps: "> 0" says common.proto, and a chunk without records may have taken none
        assert hostile.chunk.env_steps > 0 or hostile.chunk.env_steps == 0 == hostile.chunk.records.rows, "bad env_steps were stored"
        assert _episodes_fit(hostile.chunk), "bad episode statistics were taken"
    stored = hostile.chunk.records.rows if code == OK else 0
    stored_steps = hostile.chunk.env_steps if code == OK else 0
    assert _counts(buffer) == (inserts + prefix_rows + stored, env_steps + prefix_rows + stored_steps)
    counted = len(hostile.chunk.episode_returns) if stored else 0  # a chunk stores its episodes with its records
    assert buffer.stub.Sources(buffer_pb2.SourcesRequest(), timeout=TIMEOUT_S).episodes == episodes + counted
    _assert_stored_values_fit(buffer.table)
    if name == "fifo":
        _drain(buffer.table)


# ---- buffer: Sample, SampleStream, UpdatePriorities, Info ---------------------------------------------------------


def _assert_batch_fits(buffer: Buffer, sample: buffer_pb2.SampledBatch, rows: int) -> None:
    """A batch of `rows` valid records; a prioritized table's keys and weights with them, weights in [0, 1]."""
    records, _ = wire.decode_records(sample.records)
    assert len(records) == rows
    _assert_values_fit(buffer.table, records)
    if buffer.table.sampler.prioritized:
        weights = wire.decode(sample.weights)
        assert wire.decode(sample.keys).shape == weights.shape == (rows,)
        assert np.isfinite(weights).all() and (weights >= 0).all() and (weights <= 1).all()


@FUZZ
@given(batch_size=SIZES, num_batches=NUM_BATCHES, table=TABLES)
def test_sample_answers_any_size_and_table_by_name(any_buffer, batch_size, num_batches, table):
    request = buffer_pb2.SampleRequest(batch_size=batch_size, num_batches=num_batches, table=table)
    code, details, reply = _outcome(lambda: any_buffer.stub.Sample(request, timeout=TIMEOUT_S))
    allowed = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION]
    _assert_answer(code, details, allowed, ["batch_size", "num_batches", "table"])
    if code == OK:
        _assert_batch_fits(any_buffer, reply.sample, batch_size * max(num_batches, 1))


def _top_up(table: Table) -> None:
    """Fill a queue, with items of the newest possible policy version, so no credit waits for data or drops any."""
    if room := table.storage.capacity - table.info().size:
        rng = np.random.default_rng(room)
        table.insert_fields(_valid_records(table, room, rng), policy_version=2**63 - 1)


@pytest.mark.parametrize("name", ["uniform", "fifo"])
@FUZZ
@given(credits=st.lists(CREDITS, min_size=1, max_size=3))
def test_sample_stream_answers_every_credit_at_once_or_refuses_it_by_name(name, credits, request):
    """With the table full, a credit is answered or refused at once: waiting for what can never come is a hang."""
    buffer: Buffer = request.getfixturevalue(name)
    if name == "fifo":
        credits = credits[:1]  # a queue hands out each item once: a second credit would wait for new ones
        _top_up(buffer.table)
    replies = buffer.stub.SampleStream(iter(credits), timeout=TIMEOUT_S)
    for credit in credits:
        code, details, reply = _outcome(lambda: next(replies))  # noqa: B023 (called at once)
        allowed = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND]
        _assert_answer(code, details, allowed, ["batch_size", "num_batches", "table"])
        if code != OK:
            break
        _assert_batch_fits(buffer, reply.sample, credit.batch_size * max(credit.num_batches, 1))
    replies.cancel()
    _counts(buffer)


@st.composite
def priority_updates(draw: st.DrawFn, table: Table) -> tuple[buffer_pb2.UpdatePrioritiesRequest, bool]:
    """Keys (live ones, and any int64) with priorities (any float, nan and inf included), then maybe a
    hostile change: keys of another dtype or shape, one priority too many, tensors of random bytes.
    Returns the request and whether it must be refused (a bad priority the change left in place)."""
    n = draw(st.integers(0, 6))
    live = st.integers(table.storage.inserts_total - table.storage.size, table.storage.inserts_total - 1)
    keys = np.array(draw(st.lists(st.one_of(live, INT64), min_size=n, max_size=n)), np.int64)
    priorities = np.array(draw(st.lists(st.floats(width=32), min_size=n, max_size=n)), np.float64)
    request = buffer_pb2.UpdatePrioritiesRequest(table=draw(TABLES))
    wire.fill(request.keys, keys)
    wire.fill(request.priorities, priorities.astype(draw(st.sampled_from(["float32", "float64"]))))
    change = draw(st.sampled_from([None, "keys_dtype", "keys_2d", "one_more", "integer_priorities", "raw_keys", "raw_priorities"]))
    if change == "keys_dtype":
        wire.fill(request.keys, keys.astype(draw(st.sampled_from(["float64", "int32", "int8", "uint8", "bool"]))))
    elif change == "keys_2d":
        wire.fill(request.keys, keys.reshape(n, 1))
    elif change == "one_more":
        wire.fill(request.priorities, np.append(priorities, 1.0))
    elif change == "integer_priorities":
        wire.fill(request.priorities, np.arange(n))
    elif change is not None:
        tensor = request.keys if change == "raw_keys" else request.priorities
        data = draw(st.one_of(st.just(b""), st.binary(max_size=64)))
        tensor.CopyFrom(common_pb2.Tensor(data=data, shape=draw(SHAPES), dtype=draw(DTYPES)))
    bad = not np.isfinite(priorities).all() or (priorities < 0).any()
    return request, bad and change in (None, "keys_dtype")


@pytest.mark.parametrize("name", ["prioritized", "uniform"])
@FUZZ
@given(data=st.data())
def test_update_priorities_refuses_bad_keys_and_priorities_by_name_and_sampling_stays_sound(name, data, request):
    buffer: Buffer = request.getfixturevalue(name)
    update, must_refuse = data.draw(priority_updates(buffer.table))
    priorities = buffer.table.sampler.state_dict()
    code, details, reply = _outcome(lambda: buffer.stub.UpdatePriorities(update, timeout=TIMEOUT_S))
    no_priorities = [] if buffer.table.sampler.prioritized else [grpc.StatusCode.FAILED_PRECONDITION]
    allowed = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, *no_priorities]
    _assert_answer(code, details, allowed, ["keys", "priorities", "table"])
    if must_refuse:
        assert code != OK, "a nan, infinite or negative priority was accepted"
    if code == OK:
        assert 0 <= reply.updated <= math.prod(update.keys.shape)
    else:
        after = buffer.table.sampler.state_dict()
        assert all(np.array_equal(after[key], value) for key, value in priorities.items()), "a refused update changed priorities"
    sample = buffer.stub.Sample(buffer_pb2.SampleRequest(batch_size=64), timeout=TIMEOUT_S)
    _assert_batch_fits(buffer, sample.sample, 64)


@FEW
@given(table=TABLES)
def test_info_answers_any_table_name(any_buffer, table):
    code, details, reply = _outcome(lambda: any_buffer.stub.Info(buffer_pb2.InfoRequest(table=table), timeout=TIMEOUT_S))
    _assert_answer(code, details, [grpc.StatusCode.NOT_FOUND], ["table"])
    if code == OK:
        assert reply.table == "default" and 0 <= reply.size <= reply.capacity and reply.env_steps_total >= 0


# ---- trainer and rollout -----------------------------------------------------------------------------------------

PATH_PARTS = st.sampled_from(["..", ".", "", "/", "\0", "a", "ck.pth", "x.pth", ".pth", "a" * 300, "~", " ", "\n", "é", "logs"])
PATHS = st.one_of(
    st.text(max_size=30),
    st.lists(PATH_PARTS, max_size=5).map("/".join),
    st.lists(PATH_PARTS, max_size=4).map(lambda parts: "/".join(parts) + ".pth"),
)


@FUZZ
@given(path=PATHS)
def test_checkpoint_writes_only_checkpoints_inside_the_run_or_refuses_the_path(trainer, path):
    outside = sorted(trainer.run.parent.iterdir())
    code, details, reply = _outcome(lambda: trainer.stub.Checkpoint(trainer_pb2.CheckpointRequest(path=path), timeout=TIMEOUT_S))
    _assert_answer(code, details, [grpc.StatusCode.INVALID_ARGUMENT], ["path"])
    checkpoints = (trainer.run / "checkpoints").resolve()
    if code == OK:
        written = Path(reply.path)
        assert written.name.endswith(".pth") and written.is_file() and written.resolve().parent == checkpoints, "a file, in no new folder"
    else:
        assert details.startswith("path: ")
    assert sorted(trainer.run.parent.iterdir()) == outside and {p.name for p in trainer.run.iterdir()} <= {"logs", "checkpoints"}


@FEW
@given(after_version=INT64, other_epoch=INT64)
def test_watch_policy_sends_only_newer_weights_for_any_version(trainer, after_version, other_epoch):
    """The trainer holds version 0 of its epoch: an older `after_version` of that epoch, or any version of
    another epoch (a restarted trainer's count means nothing to it), gets it at once; any other waits."""
    for epoch in (other_epoch, trainer.epoch):
        waits = epoch == trainer.epoch and after_version >= 0
        request = trainer_pb2.WatchPolicyRequest(after_version=after_version, epoch=epoch)
        call = trainer.stub.WatchPolicy(request, timeout=WAIT_S if waits else TIMEOUT_S)
        code, details, reply = _outcome(lambda: next(call))  # noqa: B023 - called at once
        call.cancel()
        expected = grpc.StatusCode.DEADLINE_EXCEEDED if waits else OK
        assert code == expected, f"{code.name}: {details}"
        if code == OK:
            assert reply.weights.version == 0 and reply.weights.epoch == trainer.epoch
    trainer.stub.Status(trainer_pb2.StatusRequest(), timeout=TIMEOUT_S)


# ---- found by the fuzzing above ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["BufferService.Info", "BufferService.Add", "BufferService.SampleStream"])
def test_a_request_that_does_not_parse_is_invalid_argument_naming_it(uniform, method):
    """Was INTERNAL ("Exception deserializing request!"), raised by gRPC before any servicer code ran."""
    with pytest.raises(grpc.RpcError) as e:
        _raw_call(uniform.channel, METHODS[method], b"\x00")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("request: Error parsing message with type 'titan_rl.v1.")


def test_a_chunk_without_records_may_not_take_env_steps_off_the_count(uniform):
    """Was stored: an empty chunk with env_steps -5 took 5 off the table's count of env steps."""
    _, env_steps = _counts(uniform)
    chunk = wire.encode_chunk(transitions(0), env_steps=-5)
    with pytest.raises(grpc.RpcError) as e:
        list(uniform.stub.Add(iter([buffer_pb2.AddRequest(chunk=chunk, ack=True)]), timeout=TIMEOUT_S))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("chunk.env_steps: must be >= 0, got -5")
    assert _counts(uniform)[1] == env_steps


def test_env_steps_that_would_carry_the_count_past_int64_are_refused_and_info_still_answers():
    """Was stored, and every Info and sampled batch after it failed UNKNOWN: the count no longer fit their int64 field."""
    with _buffer("config/cartpole.yaml") as buffer:
        chunks = [wire.encode_chunk(transitions(8), env_steps=steps) for steps in (8, 2**63 - 1)]
        with pytest.raises(grpc.RpcError) as e:
            list(buffer.stub.Add(iter([buffer_pb2.AddRequest(chunk=c, ack=True) for c in chunks]), timeout=TIMEOUT_S))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("chunk.env_steps: 9223372036854775807 more")
        assert _counts(buffer) == (8, 8)


@pytest.mark.parametrize("shape", [[0] * 65, [2**62, 2**62, 0]])
def test_keys_of_a_shape_numpy_cannot_hold_are_invalid_argument_naming_them(prioritized, shape):
    """Was FAILED_PRECONDITION "table: maximum supported dimension ...": numpy's ValueError, taken for the table's."""
    request = buffer_pb2.UpdatePrioritiesRequest(keys=common_pb2.Tensor(shape=shape, dtype="int64"))
    wire.fill(request.priorities, np.zeros(0, np.float32))
    with pytest.raises(grpc.RpcError) as e:
        prioritized.stub.UpdatePriorities(request, timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("keys: shape (")


def test_a_replay_batch_larger_than_the_table_is_refused_instead_of_waited_for_forever(uniform):
    """Was never answered: a SampleStream credit waited for 1001 items in a table that holds 1000 at most."""
    replies = uniform.stub.SampleStream(iter([buffer_pb2.SampleStreamRequest(batch_size=1001)]), timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as e:
        next(replies)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "batch_size=1001 is over the table's capacity of 1000 items"


def test_a_checkpoint_name_too_long_for_the_file_system_is_invalid_argument_and_the_longest_taken_is_written(trainer):
    """Was UNKNOWN: the OSError (ENAMETOOLONG) of looking for an existing file escaped the servicer. The
    longest name taken leaves room for the checkpoint's temporary name (`.<name>.tmp<pid>`)."""
    trainer.stub.Checkpoint(trainer_pb2.CheckpointRequest(), timeout=TIMEOUT_S)  # the directory exists: the name is looked up
    for length in (256, 241):
        with pytest.raises(grpc.RpcError) as e:
            trainer.stub.Checkpoint(trainer_pb2.CheckpointRequest(path="a" * (length - 4) + ".pth"), timeout=TIMEOUT_S)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(f"path: {'a' * (length - 4) + '.pth'!r} must be a file name ending in .pth")
    written = trainer.stub.Checkpoint(trainer_pb2.CheckpointRequest(path="a" * 236 + ".pth"), timeout=TIMEOUT_S).path
    assert Path(written).name == "a" * 236 + ".pth" and Path(written).is_file()


# ---- last: Stop ----------------------------------------------------------------------------------------------------


@FEW
@given(data=st.binary(max_size=60))
def test_stop_takes_any_bytes_by_name_and_the_trainer_keeps_answering(trainer, data):
    code, details, _ = _outcome(lambda: _raw_call(trainer.channel, STOP, data))
    if _decoded(STOP, data) is None:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request: "), f"{code.name}: {details}"
    else:
        assert code == OK, f"{code.name}: {details}"
    assert trainer.stub.Status(trainer_pb2.StatusRequest(), timeout=TIMEOUT_S).policy_version == 0
    assert trainer.stub.GetPolicy(trainer_pb2.GetPolicyRequest(), timeout=TIMEOUT_S).weights.version == 0
