"""numpy <-> protobuf codec: the only module that touches tensor bytes.

A tensor travels as raw little-endian bytes plus shape and dtype name; records (whatever fields
the algorithm declares) travel one per row (titan_rl.records) plus the layout of a row. Decoding is a zero-copy
`np.frombuffer` view (read-only), never pickle.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from titan_rl.errors import WireError
from titan_rl.records import RecordLayout

try:
    from titan_rl.v1 import common_pb2
except ImportError as e:  # the generated package is not committed
    raise ImportError("titan_rl.v1 protobuf modules are missing: run `bash generate_proto.sh`") from e

_MAX_DIMS = 32  # numpy's limit is 64; no record field needs more than a handful
_ALLOWED_DTYPES = {name: np.dtype(name) for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")}


def fill(tensor: common_pb2.Tensor, array: np.ndarray) -> common_pb2.Tensor:
    """Write `array` into an existing Tensor message (for example a field of a larger message).

    Filling in place matters: building a Tensor and then nesting it copies every byte again
    (a 110 KB sample response took 240 us nested and 39 us filled in place).
    """
    array = np.asarray(array)
    if array.dtype.name not in _ALLOWED_DTYPES:
        raise WireError(f"dtype {array.dtype.name} cannot travel; use one of {sorted(_ALLOWED_DTYPES)}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    tensor.data = np.ascontiguousarray(array).tobytes()
    tensor.shape[:] = array.shape
    tensor.dtype = array.dtype.name
    return tensor


def encode(array: np.ndarray) -> common_pb2.Tensor:
    return fill(common_pb2.Tensor(), array)


def decode(tensor: common_pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """View a Tensor message as a read-only array; `name` goes into the error message.

    Runs once per field of every chunk and batch, so it reads `data` once (each read copies the
    bytes) and avoids numpy calls on Python ints.
    """
    dtype = _ALLOWED_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise WireError(f"{name}: unknown dtype {tensor.dtype!r}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{name}: negative dimension in shape {shape}")
    data = tensor.data
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise WireError(f"{name}: {len(data)} bytes do not fill shape {shape} of {dtype.name} ({expected} bytes)")
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as e:  # a shape numpy cannot hold: over 64 dimensions, or beside a 0 ones whose product passes its index range
        raise WireError(f"{name}: shape {shape}: {e}") from None


def encode_layout(layout: RecordLayout) -> common_pb2.RecordLayout:
    """`layout` as a message, for `fill_records`. Build it once per layout: adding the six fields
    of a CartPole layout costs ~18 us, copying a prepared message into a batch ~1 us."""
    message = common_pb2.RecordLayout(record_size=layout.record_size)
    for name, slot in layout.slots.items():
        message.fields.add(name=name, dtype=slot.dtype.name, shape=slot.shape, offset=slot.offset)
    return message


def fill_records(batch: common_pb2.RecordBatch, records: np.ndarray, layout: common_pb2.RecordLayout) -> common_pb2.RecordBatch:
    """Write [rows, record_size] uint8 `records`, laid out as `layout` says, into an existing RecordBatch (see `fill`)."""
    batch.layout.CopyFrom(layout)
    batch.data = records.tobytes()
    batch.rows = len(records)
    return batch


@functools.lru_cache(maxsize=64)
def _decode_layout(serialized: bytes) -> RecordLayout:
    """Check a layout once: keyed on its bytes (~1 us to get), where reading its fields cost ~15 us a message."""
    message = common_pb2.RecordLayout.FromString(serialized)
    record_size = message.record_size
    if record_size <= 0:
        raise WireError(f"record_size must be > 0, got {record_size}")
    spans = {}
    for field in message.fields:
        name, shape, offset = field.name, tuple(field.shape), field.offset
        dtype = _ALLOWED_DTYPES.get(field.dtype)
        if dtype is None:
            raise WireError(f"{name}: unknown dtype {field.dtype!r}")
        if len(shape) > _MAX_DIMS or any(d < 0 for d in shape):
            raise WireError(f"{name}: shape {shape} needs at most {_MAX_DIMS} dimensions, none negative")
        if math.prod(d for d in shape if d) * dtype.itemsize > record_size:  # also bounds the dims of a zero-size field
            raise WireError(f"{name}: shape {shape} of {dtype.name} cannot fit a {record_size}-byte record")
        nbytes = math.prod(shape) * dtype.itemsize
        if offset < 0 or offset + nbytes > record_size:
            raise WireError(f"{name}: {nbytes} bytes at offset {offset} do not fit a {record_size}-byte record")
        if name in spans:
            raise WireError(f"{name}: appears twice")
        spans[name] = (shape, dtype, offset, nbytes)
    placed = sorted((offset, offset + nbytes, name) for name, (_, _, offset, nbytes) in spans.items() if nbytes)
    for (_, end, first), (start, _, second) in itertools.pairwise(placed):
        if start < end:
            raise WireError(f"{second}: overlaps {first} in the record")
    return RecordLayout.from_spans(spans, record_size)


def decode_records(batch: common_pb2.RecordBatch, required: Iterable[str] = ()) -> tuple[np.ndarray, RecordLayout]:
    """A RecordBatch as a read-only [rows, record_size] uint8 view of its bytes and its layout
    (`layout.views(records)` gives the fields). A field in `required` that is missing, or a
    layout that does not fit the data, is a WireError naming it."""
    layout = _decode_layout(batch.layout.SerializeToString())
    for name in required:
        if name not in layout.slots:
            raise WireError(f"{name}: missing")
    data, rows = batch.data, batch.rows
    if rows < 0 or len(data) != rows * layout.record_size:
        raise WireError(f"data: {len(data)} bytes are not {rows} rows of {layout.record_size} bytes")
    return np.frombuffer(data, np.uint8).reshape(rows, layout.record_size), layout


@functools.lru_cache(maxsize=64)
def _packing(spec: tuple[tuple[str, tuple[int, ...], np.dtype], ...]) -> tuple[RecordLayout, common_pb2.RecordLayout]:
    for name, _, dtype in spec:
        if dtype.name not in _ALLOWED_DTYPES:
            raise WireError(f"{name}: dtype {dtype.name} cannot travel; use one of {sorted(_ALLOWED_DTYPES)}")
    layout = RecordLayout.for_spec({name: (shape, dtype) for name, shape, dtype in spec})
    return layout, encode_layout(layout)


def fill_chunk(
    chunk: common_pb2.RecordChunk,
    fields: Mapping[str, np.ndarray],
    worker_id: int = 0,
    policy_version: int = -1,
    env_steps: int | None = None,
    episode_returns: Sequence[float] = (),
    episode_lengths: Sequence[int] = (),
    replica_id: int = 0,
) -> common_pb2.RecordChunk:
    """Pack record fields (equal-length arrays, any names) into an existing RecordChunk, one record per row.

    The layout is `RecordLayout.for_fields`, the one a table stores for the same spec, so it copies
    the rows whole. `env_steps` defaults to the row count (one env step per record). The episodes
    that finished in those env steps and the sender's replica id feed the buffer's statistics.
    """
    if not fields:
        raise WireError("records: a chunk needs at least one field")
    arrays = {name: np.asarray(a) for name, a in fields.items()}
    first = next(iter(arrays))
    rows = len(arrays[first]) if arrays[first].ndim else -1
    for name, a in arrays.items():
        if a.ndim == 0 or len(a) != rows:
            raise WireError(f"{name}: has {len(a) if a.ndim else 'no'} rows but {first} has {rows}")
    layout, message = _packing(tuple((name, a.shape[1:], a.dtype) for name, a in arrays.items()))
    fill_records(chunk.records, layout.pack(arrays, rows), message)
    chunk.worker_id = worker_id
    chunk.policy_version = policy_version
    chunk.env_steps = rows if env_steps is None else env_steps
    chunk.episode_returns.extend(episode_returns)
    chunk.episode_lengths.extend(episode_lengths)
    chunk.replica_id = replica_id
    return chunk


def encode_chunk(
    fields: Mapping[str, np.ndarray], worker_id: int = 0, policy_version: int = -1, env_steps: int | None = None
) -> common_pb2.RecordChunk:
    return fill_chunk(common_pb2.RecordChunk(), fields, worker_id, policy_version, env_steps)


def decode_chunk(chunk: common_pb2.RecordChunk) -> tuple[np.ndarray, RecordLayout]:
    """A chunk's records and their layout (see `decode_records`); errors name `records.<field>`."""
    if not chunk.HasField("records"):
        raise WireError("records: missing")
    try:
        return decode_records(chunk.records)
    except WireError as e:
        raise WireError(f"records.{e}") from None


def decode_chunk_episodes(chunk: common_pb2.RecordChunk) -> tuple[list[float], list[int]]:
    """A chunk's finished episodes (returns, lengths); WireError naming the field unless the returns
    are finite, the lengths >= 1 and as many, and the replica id >= 0."""
    returns, lengths = list(chunk.episode_returns), list(chunk.episode_lengths)
    if len(lengths) != len(returns):
        raise WireError(f"episode_lengths: {len(lengths)} for {len(returns)} episode_returns")
    if not all(math.isfinite(r) for r in returns):
        raise WireError("episode_returns: must be finite")
    if any(length < 1 for length in lengths):
        raise WireError("episode_lengths: must be >= 1")
    if chunk.replica_id < 0:
        raise WireError(f"replica_id: must be >= 0, got {chunk.replica_id}")
    return returns, lengths


def encode_weights(arrays: Mapping[str, np.ndarray], version: int, env_steps: int = 0, epoch: int = 0) -> common_pb2.PolicyWeights:
    """Named arrays (a state_dict as numpy) -> PolicyWeights."""
    return common_pb2.PolicyWeights(
        version=version,
        env_steps=env_steps,
        epoch=epoch,
        tensors=[common_pb2.NamedTensor(name=name, tensor=encode(a)) for name, a in arrays.items()],
    )


def decode_weights(weights: common_pb2.PolicyWeights) -> dict[str, np.ndarray]:
    """PolicyWeights -> named read-only arrays; `torch.from_numpy(a.copy())` makes them a state_dict."""
    return {nt.name: decode(nt.tensor, nt.name) for nt in weights.tensors}
