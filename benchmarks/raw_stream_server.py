"""The ceiling for buffer traffic: a gRPC server that moves raw bytes with no protobuf and no work.

`python -m benchmarks.raw_stream_server --port P` serves, next to the standard health service and
with the buffer's own server options and thread pool (titan_rl.rpc.make_server):
  /bench.RawStream/Drain   (client streaming) reads messages until the client ends the stream and
                           answers once, with how many it read (8 bytes): a free stream, paced only
                           by HTTP/2 flow control;
  /bench.RawStream/Sink    answers every message whose first byte is not 0 with a 4-byte ack, as Add
                           answers every request that asks for one;
  /bench.RawStream/Source  answers every request (the payload size, 8 bytes) with that many bytes,
                           as SampleStream answers every credit with a batch;
  /bench.RawStream/Push    (server streaming) answers one request (the payload size) with messages of
                           that many bytes until the client cancels: a free stream, paced only by
                           HTTP/2 flow control.
  /bench.RawStream/PushSampled  as Push, but each message is sampled: the least work any replay
                           buffer does for one, with no protobuf and no protocol of ours. It draws
                           row indices uniformly from as many stored records as the buffer holds,
                           gathers those records and sends them with the indices as one bytes
                           object. The request is `sampled_request`.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator

import grpc
import numpy as np

from titan_rl.rpc import make_server, set_serving
from titan_rl.service import die_with_parent, keep_freed_memory, serve_until_signal, setup_logging

SERVICE = "bench.RawStream"
SINK = f"/{SERVICE}/Sink"
SOURCE = f"/{SERVICE}/Source"
PUSH = f"/{SERVICE}/Push"
DRAIN = f"/{SERVICE}/Drain"
PUSH_SAMPLED = f"/{SERVICE}/PushSampled"
ACK = bytes(4)


def sampled_request(rows: int, record_bytes: int, stored: int) -> bytes:
    """PushSampled's request: messages of `rows` records of `record_bytes` bytes, drawn from `stored`
    records (the buffer's capacity: it sets how often the gather misses cache), then their int64 indices."""
    return b"".join(x.to_bytes(8, "little") for x in (rows, record_bytes, stored))


@functools.cache
def _stored_records(stored: int, record_bytes: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (stored, record_bytes), dtype=np.uint8)


def sink_round(size: int, every: int) -> list[bytes]:
    """`every` Sink messages of `size` bytes, of which the last asks for an ack."""
    return [bytes(size)] * (every - 1) + [b"\x01" + bytes(size - 1)]


def _sink(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for request in requests:
        if request[0]:
            yield ACK


def _source(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    payloads: dict[int, bytes] = {}
    for request in requests:
        size = int.from_bytes(request, "little")
        yield payloads.setdefault(size, bytes(size))


def _drain(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return sum(1 for _ in requests).to_bytes(8, "little")


def _push(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    payload = bytes(int.from_bytes(request, "little"))
    while context.is_active():
        yield payload


def _push_sampled(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    """Sample each message on the sending thread, where gRPC's Push sends its constant one."""
    rows, record_bytes, size = (int.from_bytes(request[i : i + 8], "little") for i in (0, 8, 16))
    stored, rng = _stored_records(size, record_bytes), np.random.default_rng()
    while context.is_active():
        indices = rng.integers(0, size, rows)
        yield np.take(stored, indices, axis=0).tobytes() + indices.tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    setup_logging()
    die_with_parent()
    keep_freed_memory()  # as every TITAN-RL service does
    server, _, health = make_server(args.host, args.port)
    handlers = {
        "Sink": grpc.stream_stream_rpc_method_handler(_sink),
        "Source": grpc.stream_stream_rpc_method_handler(_source),
        "Push": grpc.unary_stream_rpc_method_handler(_push),
        "Drain": grpc.stream_unary_rpc_method_handler(_drain),
        "PushSampled": grpc.unary_stream_rpc_method_handler(_push_sampled),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    server.start()
    set_serving(health, [SERVICE])
    serve_until_signal(server, "raw stream server")


if __name__ == "__main__":
    main()
