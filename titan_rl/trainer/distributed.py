"""Data-parallel learners on torch.distributed: `train.learners` processes, each with its own
sample stream from the buffer, averaging gradients so that every optimizer step sees the combined
batch. Rank 0 is the trainer service (it publishes weights, evaluates and checkpoints); ranks 1..N-1
are learner processes it starts on the same host. gloo carries the gradients (CPU tensors).

Every update takes two collectives: `LearnerGroup.agree` (does every rank go on?) and one
all-reduce of the flattened gradients at the end of the backward pass (what DistributedDataParallel
does), so an algorithm's own clipping and optimizer step see the averaged gradient and its code
needs no change. A rank that stops says so at its next `agree`; the others stop there too.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import multiprocessing.synchronize
import os
import signal
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from titan_rl.algorithm import Learner, to_batch
from titan_rl.clients.buffer import PriorityUpdater
from titan_rl.config import Config
from titan_rl.errors import TitanError

log = logging.getLogger(__name__)

GROUP_TIMEOUT_S = 300.0  # a collective that waits this long for a rank raises instead of hanging
WAIT_POLL_S = 0.5


class LearnerGroup:
    """This process's place in the group of data-parallel learners."""

    def __init__(self, rank: int, world_size: int, init_method: str, timeout_s: float = GROUP_TIMEOUT_S):
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        self.rank, self.world_size = rank, world_size
        self.open = True

    def agree(self, going_on: bool) -> bool:
        """True while every rank goes on; the first False (or a rank gone) ends it for all."""
        if not self.open:
            return False
        flag = torch.tensor([1 if going_on else 0], dtype=torch.int32)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        except RuntimeError as e:  # a rank died: its socket closed, or the timeout ran out
            log.error("learner group: a rank is gone (%s)", e)
            flag[0] = 0
        self.open = bool(flag.item())
        return self.open

    def share_from_rank_0(self, learner: Learner) -> None:
        """Every rank continues from rank 0's learner, bit for bit: parameters, target network and
        optimizer state. Tensors only, broadcast in place (no pickle crosses the group); every rank
        must hold a state of the same structure, i.e. have resumed the same checkpoint or none."""
        state = learner.state_dict()
        tensors = list(_tensors(state))
        layout = torch.tensor([len(tensors), sum(t.numel() for t in tensors)], dtype=torch.int64)
        expected = layout.clone()
        dist.broadcast(expected, src=0)
        if not torch.equal(layout, expected):
            raise TitanError(f"learner rank {self.rank}: its state has {layout.tolist()} (tensors, values), rank 0's {expected.tolist()}")
        for tensor in tensors:
            dist.broadcast(tensor, src=0)
        if self.rank != 0:
            learner.load_state_dict(state)

    def close(self) -> None:
        """Tell the others this rank stops (unless the group already ended), then leave it."""
        if self.open:
            self.agree(False)
        dist.destroy_process_group()


def _tensors(tree: object) -> Iterator[torch.Tensor]:
    """Every tensor of a state dict, in the order its structure gives (the same on every rank)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value)


def average_gradients(network: nn.Module, world_size: int) -> None:
    """Average the gradients over the group at the end of every backward pass, as one all-reduce of
    all of them flattened (one message where one per parameter cost a scheduler round-trip each on
    a busy machine). Queued from the first gradient accumulated, as DistributedDataParallel does, so
    it runs before the algorithm clips and steps; a parameter without a gradient counts as zero."""
    parameters = [p for p in network.parameters() if p.requires_grad]
    queued = False

    def all_reduce() -> None:
        nonlocal queued
        queued = False
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for p in parameters:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def accumulated(_: torch.Tensor) -> None:
        nonlocal queued
        if not queued:
            queued = True
            torch.autograd.Variable._execution_engine.queue_callback(all_reduce)

    for parameter in parameters:
        parameter.register_post_accumulate_grad_hook(accumulated)


class LearnerRanks:
    """Ranks 1..train.learners-1 as processes of their own (spawned: no fork of gRPC state).

    `stop()` first tells them through an event they poll while they wait for batches, so that each
    meets rank 0's closing `agree(False)` with a collective of its own instead of waiting for a
    batch that may never come."""

    def __init__(self, cfg: Config, init_method: str):
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self.procs = [
            ctx.Process(target=run_learner_rank, args=(cfg, rank, init_method, os.getpid(), self._stop), daemon=True)
            for rank in range(1, cfg.train.learners)
        ]
        for proc in self.procs:
            proc.start()

    def stop(self, group: LearnerGroup | None) -> None:
        self._stop.set()
        if group is not None:
            group.close()
        for proc in self.procs:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()


def run_learner_rank(cfg: Config, rank: int, init_method: str, parent_pid: int, stop: mp.synchronize.Event) -> None:
    """A learner of rank >= 1: its own sample stream, the group's averaged gradients, no publishing."""
    from titan_rl.clients.buffer import BatchPrefetcher
    from titan_rl.registry import build_algorithm, build_policy
    from titan_rl.service import setup_logging
    from titan_rl.tls import load_tls, use_tls
    from titan_rl.trainer.resume import resume_learner

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 ends the group; Ctrl-C reaches it
    setup_logging()
    use_tls(load_tls(cfg.security))
    torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.seed + rank)
    algorithm = build_algorithm(cfg)
    learner = algorithm.make_learner(build_policy(cfg))
    resume_learner(cfg, learner)  # the checkpoint rank 0 resumed, if any: the same state structure
    group = LearnerGroup(rank, cfg.train.learners, init_method)
    group.share_from_rank_0(learner)
    average_gradients(learner.network, group.world_size)
    t, table = cfg.train, algorithm.table()
    batches = BatchPrefetcher(
        cfg.buffer_server.dial_address, t.batch_size, t.batches_per_request(), t.prefetch_requests, table.name,
        peer_timeout_s=cfg.durability.peer_timeout_s,
    )  # fmt: skip
    priorities = PriorityUpdater(cfg.buffer_server.dial_address, table.name) if table.kind == "prioritized" else None
    try:
        keep_going = lambda: os.getppid() == parent_pid and not stop.is_set()  # noqa: E731
        train_rank(learner, group, lambda: batches.next(timeout_s=WAIT_POLL_S), keep_going, priorities)
    except TitanError as e:
        log.error("learner rank %d: %s", rank, e)
    finally:
        group.close()
        batches.close()
        if priorities is not None:
            priorities.close()


def train_rank(
    learner: Learner, group: LearnerGroup, next_sample: Callable, keep_going: Callable[[], bool], priorities: PriorityUpdater | None = None
) -> None:
    """Update on this rank's own batches while every rank goes on."""
    while keep_going():
        sample = next_sample()
        if sample is None:
            continue
        if not group.agree(True):
            return
        batch = to_batch(sample.fields, sample.keys, sample.weights)
        learner.update(batch)
        if batch.new_priorities is not None and priorities is not None:
            priorities.put(batch.keys, batch.new_priorities)
