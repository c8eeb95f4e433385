"""The rollout process: fork the workers, serve their statistics, stop (`python -m titan_rl.rollout`).

Workers pull weights from `trainer_server.address` and write to `buffer_server.address`,
so any number of rollout replicas on any hosts can feed one buffer.
"""

from __future__ import annotations

import logging

from titan_rl.config import Config
from titan_rl.envs import check_env_spaces
from titan_rl.errors import TitanError
from titan_rl.rollout.service import RolloutServicer, WorkerPool
from titan_rl.rollout.stats import TrajectoryStats
from titan_rl.rpc import make_server, set_serving
from titan_rl.service import hangup_log_path, serve_until_signal
from titan_rl.v1 import rollout_pb2, rollout_pb2_grpc

log = logging.getLogger("titan_rl.rollout")


def start(cfg: Config):
    """Check the env, start the workers and the server; returns (server, bound port, pool).

    Each worker builds the algorithm and checks the network fits before it acts."""
    check_env_spaces(cfg)
    stats = TrajectoryStats(cfg.rollout_server.num_workers)
    pool = WorkerPool(cfg, stats)
    pool.start()  # forks: before any gRPC
    server, port, health = make_server(cfg.rollout_server.host, cfg.rollout_server.port)
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(stats), server)
    server.start()
    set_serving(health, [rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name])
    return server, port, pool


def run_service(cfg: Config) -> None:
    """Serve until stopped (a signal, the end of the run, or a peer gone for good); exits non-zero
    where a supervisor should start it again."""
    try:
        server, port, pool = start(cfg)
    except TitanError as e:
        raise SystemExit(f"error: {e}") from None
    r = cfg.rollout_server
    log.info("rollout serving on %s:%d: %d workers x %d %s envs", r.host, port, r.num_workers, r.envs_per_worker, r.env_name)
    serve_until_signal(server, "rollout", on_stop=pool.stop, stop_event=pool.ended, hangup_log=hangup_log_path(cfg, "rollout"))
    if pool.failed.is_set():
        raise SystemExit(1)
