"""The trainer process: build the learner, serve its weights and status, train until the budget is met (`python -m titan_rl.trainer`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import grpc
import torch
import torch.distributed as dist

from titan_rl.algorithm import Learner
from titan_rl.clients.buffer import BatchPrefetcher, BufferClient, PriorityUpdater
from titan_rl.config import Config, default_run_name
from titan_rl.errors import ConfigError, TitanError
from titan_rl.evaluation import Evaluator, VideoJob
from titan_rl.metrics import MetricsLogger
from titan_rl.registry import build_algorithm, build_policy
from titan_rl.rpc import make_server, set_serving
from titan_rl.service import on_stop_signals
from titan_rl.shared_keys import use_shared_keys
from titan_rl.trainer.device import distributed_backend, resolve_device, use_device
from titan_rl.trainer.distributed import LearnerGroup, average_gradients, group_store
from titan_rl.trainer.loop import LEARNER_LOST, NO_DATA, Summary, TrainingLoop
from titan_rl.trainer.policy_store import PolicyStore
from titan_rl.trainer.ranks import LearnerRanks
from titan_rl.trainer.resume import best_of_run, resume_learner
from titan_rl.trainer.service import TrainerServicer
from titan_rl.v1 import trainer_pb2, trainer_pb2_grpc

log = logging.getLogger("titan_rl.trainer")

VIDEO_TIMEOUT_S = 300.0

END_RUN_GRACE_S = 1.0


def check_writable(checkpoint_path: str) -> None:
    """Fail at start, not at the first good evaluation, when checkpoints cannot be written."""
    parent = Path(checkpoint_path).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"logging.checkpoint_path={checkpoint_path!r}: cannot create {parent}: {e}") from e
    if not os.access(parent, os.W_OK) or Path(checkpoint_path).is_dir():
        raise ConfigError(f"logging.checkpoint_path={checkpoint_path!r}: not a writable file path")


def end_run(store: PolicyStore, buffer_address: str, reason: str) -> None:
    """Tell the actors (through their weight subscriptions) and the buffer that training has ended,
    so that they exit 0 on their own hosts too; a buffer that cannot be told is logged, not waited for."""
    store.finish()
    time.sleep(END_RUN_GRACE_S)  # the actors hear first, so they stop sending before the buffer goes
    client = BufferClient(buffer_address, timeout_s=5.0)
    try:
        client.end_run(reason)
    except (grpc.RpcError, TitanError) as e:
        log.warning("could not tell the buffer %s that the run ended: %s", buffer_address, e)
    finally:
        client.close()


def record_video(cfg: Config, summary: Summary, logger: MetricsLogger, evaluator: Evaluator) -> None:
    """One greedy episode of the run's best checkpoint to <run folder>/video.mp4 and W&B, recorded by
    the evaluator process. A finished run stays finished whatever happens here: a warning only."""
    checkpoint = Path(summary.checkpoint)
    if not checkpoint.exists():
        log.info("no video: no checkpoint was written")
        return
    path = logger.run_dir / "video.mp4"
    try:
        episode_return, length = evaluator.record(VideoJob(str(checkpoint), str(path), cfg.seed), VIDEO_TIMEOUT_S)
    except TitanError as e:
        log.warning("no video of the agent: %s", e)
        return
    log.info("video of one greedy episode (return %g, %d steps): %s", episode_return, length, path)
    logger.log_video(path, summary.env_steps)


def start_learner_group(cfg: Config, learner: Learner) -> tuple[LearnerRanks | None, LearnerGroup]:
    """This process as rank 0 of `train.learners` data-parallel learners: ranks 1.. run on this host
    (started here) or, with `train.learner_group_address`, on hosts of their own. They start from
    this process's (perhaps resumed) learner and average gradients from then on."""
    t = cfg.train
    remote = bool(t.learner_group_address)
    if not remote:
        resolve_device(t.device, local_rank=t.learners - 1)  # every local rank has a GPU of its own
    try:
        address = t.learner_group_address or "127.0.0.1:0"
        store = group_store(address, 0, t.learners)
        if remote:
            ranks = None
            log.info("learner group: waiting at %s for ranks 1..%d (python -m titan_rl.trainer.learner)", t.learner_group_address,
                     t.learners - 1)  # fmt: skip
        else:
            ranks = LearnerRanks(cfg, f"127.0.0.1:{store.port}")
        group = LearnerGroup(0, t.learners, store, learner.device, loopback=address.rpartition(":")[0] == "127.0.0.1")
        group.share_from_rank_0(learner)
    except dist.DistError as e:
        where = f"train.learner_group_address={t.learner_group_address}" if remote else "the local learner ranks"
        raise TitanError(f"learner group ({where}): ranks 1..{t.learners - 1} did not join: {e}") from e
    average_gradients(learner.network, group)
    log.info("learner group of %d processes (torch.distributed, %s): %d rows per optimizer step", group.world_size,
             distributed_backend(learner.device), group.world_size * t.batch_size)  # fmt: skip
    return ranks, group


def run(cfg: Config) -> Summary:
    """Build everything from `cfg`, serve, train until the budget is met, and shut the server down."""
    evaluator = Evaluator(cfg, cfg.eval.episodes, start_method="fork")
    evaluator.start()  # first: a fork of this process before any torch work, thread or gRPC
    torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.seed)
    algorithm = build_algorithm(cfg)
    policy = build_policy(cfg)
    algorithm.check_network(policy)
    device = resolve_device(cfg.train.device)
    use_device(device)
    learner = algorithm.make_learner(policy.to(device))
    if not isinstance(learner, Learner):
        raise TitanError(f"algorithm.path={cfg.algorithm.path!r}: make_learner returned {type(learner).__name__}, not a Learner")
    check_writable(cfg.logging.checkpoint_path)
    if not cfg.logging.run_name:
        log.warning("logging.run_name is not set: a restarted trainer starts a new run instead of resuming this one")
        cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, run_name=default_run_name(cfg)))
        use_shared_keys(cfg, "trainer")  # the buffer compares the run it serves with this one
    name = cfg.logging.run_name
    counters = resume_learner(cfg, learner)
    logger = MetricsLogger(cfg, Path(cfg.logging.run_dir) / name, name, wandb_start_method="fork")  # no thread or gRPC yet
    try:  # from here a failure finishes the W&B run, rather than leaving exit to terminate its writer mid-open
        store = PolicyStore(first_version=int(counters.get("policy_version", -1)) + 1)
        t, table = cfg.train, algorithm.table()
        address, peer_timeout_s = cfg.buffer_server.dial_address, cfg.durability.peer_timeout_s
        if table.kind == "fifo":  # on-policy: one batch per message, none acted by weights older than the lag allows
            batches = BatchPrefetcher(
                address, t.batch_size, 1, t.prefetch_requests, table.name, lambda: store.version, peer_timeout_s=peer_timeout_s
            )
        else:
            batches = BatchPrefetcher(
                address, t.batch_size, t.batches_per_request(), t.prefetch_requests, table.name, peer_timeout_s=peer_timeout_s
            )
        priorities = PriorityUpdater(address, table.name) if table.kind == "prioritized" else None
        sources = BufferClient(address, timeout_s=1.0)  # episode statistics of every rollout replica, from their chunks
        loop = TrainingLoop(cfg, learner, batches, store, logger, evaluator, sources=sources.sources, priorities=priorities)
        loop.best_eval = best_of_run(cfg)  # even for a trainer that lost its last checkpoint: the best stays the best
        if counters:
            loop.resume(counters)
        server, port, health = make_server(cfg.trainer_server.host, cfg.trainer_server.port)
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(loop, store), server)
        loop.publish()
        server.start()
        set_serving(health, [trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name])
        log.info("trainer serving on %s:%d, run %s, learning on %s", cfg.trainer_server.host, port, name, learner.device)
        on_stop_signals(lambda _: loop.stop(end_run=False), hangup_log=logger.run_dir / "trainer.log")
    except BaseException:
        logger.close()
        evaluator.close()
        raise
    ranks: LearnerRanks | None = None
    try:
        if cfg.train.learners > 1:  # once serving: health checks answer while the other ranks come
            ranks, loop.group = start_learner_group(cfg, learner)
        logger.start()
        summary = loop.run()  # which closes the group as training stops
        if ranks is not None:  # the other learners are gone before the actors and the buffer are told
            ranks.join()
            ranks = None
        if loop.ends_run:
            end_run(store, cfg.buffer_server.dial_address, summary.stop_reason)
            if summary.stop_reason.startswith(NO_DATA):  # the run failed: nothing to record, and a supervisor should know
                raise TitanError(summary.stop_reason)
            if cfg.logging.video:
                record_video(cfg, summary, logger, evaluator)
        return summary
    finally:
        if loop.group is not None:
            loop.group.close(run_ended=False)
        if ranks is not None:
            ranks.join()
        store.close()
        evaluator.close()
        if priorities is not None:
            priorities.close()
        batches.close()
        sources.close()
        logger.close()
        server.stop(grace=1.0).wait()


def run_service(cfg: Config) -> None:
    """Train until the budget is met or the trainer is stopped; exits non-zero where a supervisor should start it again to resume."""
    try:
        summary = run(cfg)
    except TitanError as e:
        raise SystemExit(f"error: {e}") from None
    best = "-" if summary.best_eval_return is None else f"{summary.best_eval_return:.1f}"
    log.info(
        "done (%s): %d env steps, %d updates, %.1fs, best eval %s -> %s",
        summary.stop_reason,
        summary.env_steps,
        summary.updates,
        summary.wall_s,
        best,
        summary.checkpoint,
    )
    if summary.stop_reason == LEARNER_LOST:  # non-zero, so that a Job or a supervisor starts it again to resume
        raise SystemExit(f"error: {LEARNER_LOST}")
