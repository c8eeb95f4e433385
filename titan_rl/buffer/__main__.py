"""`python -m titan_rl.buffer --config FILE [--host H] [--port P]`: run the replay buffer service."""

from __future__ import annotations

import logging

from titan_rl.buffer.service import BufferServicer, replay_from_config
from titan_rl.config import Config
from titan_rl.rpc import make_server, set_serving
from titan_rl.service import parse_service_args, serve_until_signal
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc

log = logging.getLogger("titan_rl.buffer")


def start(cfg: Config):
    """Start a buffer server as configured; returns (server, bound port, replay)."""
    replay = replay_from_config(cfg)
    server, port, health = make_server(cfg.buffer_server.host, cfg.buffer_server.port)
    buffer_pb2_grpc.add_BufferServiceServicer_to_server(BufferServicer(replay), server)
    server.start()
    set_serving(health, [buffer_pb2.DESCRIPTOR.services_by_name["BufferService"].full_name])
    return server, port, replay


def main() -> None:
    cfg = parse_service_args("buffer", "buffer_server")
    server, port, replay = start(cfg)
    log.info("buffer serving on %s:%d (capacity %d)", cfg.buffer_server.host, port, cfg.buffer_server.capacity_transitions)
    serve_until_signal(server, "buffer", on_stop=replay.close)


if __name__ == "__main__":
    main()
