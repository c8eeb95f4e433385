"""Learner ranks 1..train.learners-1: their own sample stream, the group's averaged gradients, no
publishing (rank 0, the trainer, publishes, evaluates and checkpoints).

On the trainer's host the trainer starts them itself (`LearnerRanks`); on hosts of their own each
is started with `python -m titan_rl.trainer.learner` (`run_remote_rank`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from titan_rl.algorithm import Learner, to_batch
from titan_rl.clients.buffer import BatchPrefetcher, PriorityUpdater
from titan_rl.config import Config
from titan_rl.errors import TitanError
from titan_rl.trainer.distributed import LearnerGroup, average_gradients, group_store

log = logging.getLogger("titan_rl.trainer.learner")

WAIT_POLL_S = 0.5


class LearnerRanks:
    """Ranks 1..train.learners-1 as processes of this host (spawned: no fork of gRPC state), meeting
    rank 0 at `address`."""

    def __init__(self, cfg: Config, address: str):
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_spawned_rank, args=(cfg, rank, address), daemon=True) for rank in range(1, cfg.train.learners)]
        for proc in self.procs:
            proc.start()

    def join(self) -> None:
        """Wait for the ranks to leave once rank 0 has closed the group (killing any that hangs)."""
        for proc in self.procs:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()


def _spawned_rank(cfg: Config, rank: int, address: str) -> None:
    from titan_rl.service import leave_stop_signals_to_parent, setup_logging
    from titan_rl.tls import load_tls, use_tls

    leave_stop_signals_to_parent()  # rank 0 ends the group
    setup_logging()
    use_tls(load_tls(cfg.security))
    try:
        if (why := run_learner_rank(cfg, rank, rank, address)) is not None:
            log.error("learner rank %d: %s", rank, why)
    except (TitanError, dist.DistError) as e:
        log.error("learner rank %d: %s", rank, e)


def run_learner_rank(cfg: Config, rank: int, local_rank: int, address: str) -> str | None:
    """Join the group at `address` as `rank` (the `local_rank`-th learner of this host), take rank
    0's learner, and update on this rank's own batches until the group ends. None when the run
    ended; else why the group ended while the run goes on (a rank lost, or the trainer stopped)."""
    from titan_rl.registry import build_algorithm, build_policy
    from titan_rl.trainer.device import resolve_device, use_device

    torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.seed + rank)
    algorithm = build_algorithm(cfg)
    device = resolve_device(cfg.train.device, local_rank)
    use_device(device)
    learner = algorithm.make_learner(build_policy(cfg).to(device))
    store = group_store(address, rank, cfg.train.learners)
    group = LearnerGroup(
        rank, cfg.train.learners, store, device, loopback=address.rpartition(":")[0] == "127.0.0.1"
    )  # ranks started by the trainer
    t, table = cfg.train, algorithm.table()
    buffer = cfg.buffer_server.dial_address
    batches = BatchPrefetcher(
        buffer, t.batch_size, t.batches_per_request(), t.prefetch_requests, table.name, peer_timeout_s=cfg.durability.peer_timeout_s
    )
    priorities = PriorityUpdater(buffer, table.name) if table.kind == "prioritized" else None
    try:
        group.share_from_rank_0(learner)
        average_gradients(learner.network, group)
        log.info("learner rank %d of %d on %s: learning", rank, group.world_size, device)
        train_rank(learner, group, lambda: batches.next(timeout_s=WAIT_POLL_S), priorities)
        if group.run_ended():
            return None
        return group.lost or "the trainer stopped and the run goes on: start this rank again for the next trainer"
    finally:
        group.close()
        batches.close()
        if priorities is not None:
            priorities.close()


def train_rank(learner: Learner, group: LearnerGroup, next_sample: Callable, priorities: PriorityUpdater | None = None) -> None:
    """Update on this rank's own batches while every rank goes on."""
    device = learner.device
    while True:
        sample = next_sample()
        if sample is None:
            if group.stopping():
                return
            continue
        if not group.agree(True):
            return
        batch = to_batch(sample.fields, sample.keys, sample.weights, device)
        learner.env_steps = group.agreed_env_steps
        try:
            learner.update(batch)
        except RuntimeError as e:
            if group.failed(e):
                return
            raise
        if batch.new_priorities is not None and priorities is not None:
            priorities.put(batch.keys, batch.new_priorities)


def run_remote_rank(cfg: Config, rank: int, local_rank: int) -> None:
    """Rank `rank` on a host of its own, until the group ends: exits non-zero, saying why, unless the run ended."""
    address = cfg.train.learner_group_address
    try:
        why = run_learner_rank(cfg, rank, local_rank, address)
    except TitanError as e:
        sys.exit(f"error: {e}")
    except dist.DistError as e:  # the trainer never came, or went away mid-run
        sys.exit(f"error: learner rank {rank}: the learner group at {address} failed: {e}")
    if why is not None:  # non-zero, so that a Job or a supervisor starts it again for the next trainer
        sys.exit(f"error: learner rank {rank}: {why}")
    log.info("learner rank %d: the run ended", rank)
