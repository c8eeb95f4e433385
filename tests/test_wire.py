import numpy as np
import pytest
import torch

from titan_rl import wire
from titan_rl.errors import WireError
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


def test_chunk_missing_a_field_names_it():
    chunk = wire.encode_chunk({name: np.zeros(3, dtype=bool) for name in wire.TRANSITION_FIELDS})
    chunk.ClearField("reward")
    with pytest.raises(WireError, match="reward: missing"):
        wire.decode_chunk(chunk)


def test_state_dict_round_trip_loads_into_a_fresh_module():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    weights = wire.encode_weights({k: t.numpy() for k, t in net.state_dict().items()}, version=7)
    assert weights.version == 7
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    other.load_state_dict({k: torch.from_numpy(a.copy()) for k, a in wire.decode_weights(weights).items()})
    x = torch.randn(3, 4)
    torch.testing.assert_close(other(x), net(x))
