import numpy as np
import pytest
import torch

from titan_rl import wire
from titan_rl.errors import WireError
from titan_rl.records import RecordLayout
from titan_rl.v1 import common_pb2


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "int32", "uint8", "bool", "float16"])
@pytest.mark.parametrize("shape", [(0,), (5,), (3, 4), (2, 3, 84, 84)])
def test_round_trip_keeps_values_dtype_and_shape(dtype, shape):
    array = (np.arange(int(np.prod(shape))) % 7).reshape(shape).astype(dtype)
    back = wire.decode(wire.encode(array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_non_contiguous_and_big_endian_arrays_travel_correctly():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    np.testing.assert_array_equal(wire.decode(wire.encode(a)), a)
    b = np.arange(4, dtype=">i8")
    np.testing.assert_array_equal(wire.decode(wire.encode(b)), b)


def test_byte_count_that_does_not_fill_the_shape_is_rejected_by_name():
    t = common_pb2.Tensor(data=b"\0" * 12, shape=[2, 2], dtype="float32")
    with pytest.raises(WireError, match="obs: 12 bytes do not fill shape"):
        wire.decode(t, "obs")


def test_unknown_dtype_is_rejected():
    with pytest.raises(WireError, match="unknown dtype 'object'"):
        wire.decode(common_pb2.Tensor(data=b"", shape=[0], dtype="object"), "action")
    with pytest.raises(WireError):
        wire.encode(np.array(["a"]))


def test_chunk_round_trip_keeps_every_field_in_records_of_the_stored_layout():
    fields = {
        "obs": np.arange(12, dtype=np.float32).reshape(3, 4),
        "action": np.array([0, 1, 1]),
        "reward": np.array([1.0, 0.5, -1.0], ">f8"),  # big-endian input travels by value
        "next_obs": np.arange(12, 24, dtype=np.float32).reshape(3, 4),
        "terminated": np.array([False, True, False]),
        "truncated": np.array([True, False, False]),
    }
    chunk = wire.encode_chunk(fields, worker_id=2, policy_version=5, env_steps=7)
    records, layout = wire.decode_chunk(chunk)
    assert records.shape == (3, layout.record_size) and layout == RecordLayout.for_fields(fields)
    for name, want in fields.items():
        np.testing.assert_array_equal(layout.views(records)[name], want, err_msg=name)
    assert (chunk.worker_id, chunk.policy_version, chunk.env_steps) == (2, 5, 7)
    assert wire.encode_chunk(fields).env_steps == 3  # one env step per record unless told


def test_any_declared_field_travels_including_segments_with_a_time_axis():
    fields = {"obs": np.ones((2, 20, 4), np.float32), "log_prob": np.full((2, 20), -0.5, np.float32), "action": np.zeros((2, 20), np.int64)}
    records, layout = wire.decode_chunk(wire.encode_chunk(fields, env_steps=40))
    views = layout.views(records)
    assert set(views) == set(fields)
    for name, want in fields.items():
        np.testing.assert_array_equal(views[name], want, err_msg=name)


def test_chunk_with_unequal_rows_or_no_field_is_refused_before_sending():
    fields = {name: np.zeros(3, dtype=bool) for name in ("obs", "action", "reward")}
    with pytest.raises(WireError, match="reward: has 2 rows but obs has 3"):
        wire.encode_chunk({**fields, "reward": np.zeros(2, np.float32)})
    with pytest.raises(WireError, match="at least one field"):
        wire.encode_chunk({})
    with pytest.raises(WireError, match="obs: dtype str32 cannot travel"):
        wire.encode_chunk({**fields, "obs": np.array(["a", "b", "c"])})


def test_records_whose_layout_lacks_a_required_field_name_it():
    chunk = wire.encode_chunk({name: np.zeros(3, dtype=bool) for name in ("obs", "reward")})
    kept = [f for f in chunk.records.layout.fields if f.name != "reward"]
    del chunk.records.layout.fields[:]
    chunk.records.layout.fields.extend(kept)
    with pytest.raises(WireError, match="reward: missing"):
        wire.decode_records(chunk.records, required=("obs", "reward"))


def test_state_dict_round_trip_loads_into_a_fresh_module():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    weights = wire.encode_weights({k: t.numpy() for k, t in net.state_dict().items()}, version=7, env_steps=1234)
    assert (weights.version, weights.env_steps) == (7, 1234)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    other.load_state_dict({k: torch.from_numpy(a.copy()) for k, a in wire.decode_weights(weights).items()})
    x = torch.randn(3, 4)
    torch.testing.assert_close(other(x), net(x))
