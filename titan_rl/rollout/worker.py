"""One rollout worker process: act with the latest weights, ship chunks to the buffer, report stats."""

from __future__ import annotations

import logging
import multiprocessing as mp
import sys
import time

import numpy as np
import torch

from titan_rl.algorithm import Algorithm
from titan_rl.clients.buffer import ChunkSender, chunks_in_flight
from titan_rl.clients.trainer import PolicySubscriber
from titan_rl.config import Config
from titan_rl.errors import PeerUnavailableError, RejectedError, TitanError
from titan_rl.registry import build_algorithm, build_policy
from titan_rl.rollout.actor import VectorActor
from titan_rl.rollout.service import CONFIG_ERROR_EXIT_CODE, PEER_GONE_EXIT_CODE, RUN_FINISHED_EXIT_CODE
from titan_rl.rollout.stats import WorkerReport
from titan_rl.service import exit_with_parent_process, keep_freed_memory, leave_stop_signals_to_parent, setup_logging
from titan_rl.tls import load_tls, use_tls

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.5


def worker_identity(cfg: Config, worker_id: int) -> tuple[int, int]:
    """(id unique over every rollout replica, seed derived from it and cfg.seed)."""
    global_id = cfg.rollout_server.replica_id * cfg.rollout_server.num_workers + worker_id
    return global_id, int(np.random.SeedSequence([cfg.seed, global_id]).generate_state(1)[0])


def run_worker(cfg: Config, worker_id: int, stop: mp.Event, reports: mp.Queue) -> None:
    """Process entry point; returns when `stop` is set, exits with a code the pool reads when the run
    has finished or a peer is gone, and at once when the rollout service dies."""
    leave_stop_signals_to_parent()  # the rollout service stops us through `stop`
    setup_logging()
    exit_with_parent_process()
    keep_freed_memory()
    torch.set_num_threads(1)
    r = cfg.rollout_server
    _, seed = worker_identity(cfg, worker_id)
    torch.manual_seed(seed)
    try:
        use_tls(load_tls(cfg.security))  # a new process starts plaintext: its channels follow the config
        algorithm = build_algorithm(cfg)
        policy = build_policy(cfg).eval()
        algorithm.check_network(policy)
    except TitanError as e:
        log.error("worker %d: %s", worker_id, e)
        sys.exit(CONFIG_ERROR_EXIT_CODE)
    table = algorithm.table().name
    peer_timeout_s = cfg.durability.peer_timeout_s
    subscriber = PolicySubscriber(cfg.trainer_server.dial_address, peer_timeout_s)
    sender = ChunkSender(
        cfg.buffer_server.dial_address,
        max_in_flight=chunks_in_flight(r.envs_per_worker * r.vector_steps_per_chunk, r.max_unacked_rows),
        give_up_after_s=peer_timeout_s,
        table=table,
    )
    try:
        _collect(cfg, worker_id, stop, reports, algorithm, policy, subscriber, sender)
    except PeerUnavailableError as e:
        log.error("worker %d: %s", worker_id, e)
        sys.exit(PEER_GONE_EXIT_CODE)
    except RejectedError as e:  # the records of this algorithm, or the token: a new worker would send the same
        log.error("worker %d: %s", worker_id, e)
        sys.exit(CONFIG_ERROR_EXIT_CODE)
    finally:
        subscriber.close()
        sender.close(flush_timeout_s=0.0)  # stopping: what is still in flight does not matter
    if subscriber.refused.is_set():  # the token, or the address: a new worker would be refused the same way
        log.error("worker %d: %s", worker_id, subscriber.refusal)
        sys.exit(CONFIG_ERROR_EXIT_CODE)
    if subscriber.finished.is_set():
        sys.exit(RUN_FINISHED_EXIT_CODE)
    if subscriber.gone.is_set():
        sys.exit(PEER_GONE_EXIT_CODE)


def _collect(
    cfg: Config,
    worker_id: int,
    stop: mp.Event,
    reports: mp.Queue,
    algorithm: Algorithm,
    policy: torch.nn.Module,
    subscriber: PolicySubscriber,
    sender: ChunkSender,
) -> None:
    """Act with the latest weights and send what the adder writes, until `stop`, or the trainer's end
    or absence (the rollout service's death ends the process: `exit_with_parent_process`)."""
    r = cfg.rollout_server
    global_id, seed = worker_identity(cfg, worker_id)
    actor = None
    try:
        while not subscriber.wait_first(timeout_s=1.0):
            if stop.is_set() or subscriber.ended():
                return
            log.info("worker %d: waiting for the first weights from %s", worker_id, cfg.trainer_server.dial_address)
        acting = algorithm.make_actor(policy, worker_id, seed)
        actor = VectorActor(r.env_name, r.envs_per_worker, acting, algorithm.make_adder(r.envs_per_worker), seed)
        version = -1
        steps = 0
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = pending_steps = vector_steps = 0  # records, env steps and vector steps since the last chunk
        pending_returns: list[float] = []  # episodes finished since the last chunk, sent with the next one
        pending_lengths: list[int] = []
        report = WorkerReport(worker_id, 0, acting.metrics(), version)
        next_report = time.monotonic() + REPORT_EVERY_S

        def ended() -> bool:
            return stop.is_set() or subscriber.ended()

        while not ended():
            if (latest := subscriber.take()) is not None:  # swap weights between steps only
                version, acting.env_steps = latest.version, latest.env_steps
                policy.load_state_dict(latest.state)
            result = actor.step()
            rows = len(next(iter(result.records.values())))
            steps += result.env_steps
            now = time.monotonic()
            if not pending_steps:
                send_by = now + r.chunk_max_delay_s
            if rows:
                pending.append(result.records)
                pending_rows += rows
            pending_steps += result.env_steps
            vector_steps += 1
            report.episode_returns += result.episode_returns
            report.episode_lengths += result.episode_lengths
            pending_returns += result.episode_returns
            pending_lengths += result.episode_lengths
            if pending_rows and (vector_steps >= r.vector_steps_per_chunk or now >= send_by):
                chunk = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                episodes = {"episode_returns": pending_returns, "episode_lengths": pending_lengths, "replica_id": r.replica_id}
                if not sender.send(chunk, global_id, version, pending_steps, keep_waiting=lambda: not ended(), **episodes):
                    break
                pending, pending_rows, pending_steps, vector_steps = [], 0, 0, 0
                pending_returns, pending_lengths = [], []
            if now >= next_report:
                report.env_steps, report.actor_metrics, report.policy_version = steps, acting.metrics(), version
                reports.put(report)
                report = WorkerReport(worker_id, steps, report.actor_metrics, version)
                next_report = now + REPORT_EVERY_S
    finally:
        if actor is not None:
            actor.close()
