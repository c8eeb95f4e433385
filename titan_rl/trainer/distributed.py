"""Data-parallel learners on torch.distributed: `train.learners` processes, each with its own
sample stream from the buffer, averaging gradients so that every optimizer step sees the combined
batch. Rank 0 is the trainer service (it publishes weights, evaluates and checkpoints); ranks 1..N-1
are learner processes (titan_rl.trainer.learner), on the trainer's host or on hosts of their own.
gloo carries the gradients between CPU learners, NCCL between GPU ones (`train.device`).

The ranks meet at rank 0's TCPStore (`train.learner_group_address`, or a free local port). Every
update takes two collectives: `LearnerGroup.agree` (does every rank go on?) and one all-reduce of
the flattened gradients at the end of the backward pass (what DistributedDataParallel does), so an
algorithm's own clipping and optimizer step see the averaged gradient and its code needs no change.
A rank that stops says so at its next `agree`; the others stop there too. A rank waiting for
batches learns that rank 0 is ending the group from a key in the store.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging

import torch
import torch.distributed as dist
from torch import nn

from titan_rl.algorithm import Learner, cpu_state
from titan_rl.trainer.device import distributed_backend

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
GROUP_TIMEOUT_S = 300.0  # a collective (or a rank's first contact) that waits this long raises instead of hanging
STOP_KEY = "titan_rl/stop"


def group_store(address: str, rank: int, world_size: int, timeout_s: float = GROUP_TIMEOUT_S) -> dist.TCPStore:
    """Where the ranks meet: rank 0 serves it on every interface at `address`'s port (0: a free one,
    `.port` says which), the others dial `address`, retrying until rank 0 is up or `timeout_s` ends."""
    host, _, port = address.rpartition(":")
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:  # the server binds every interface; rank 0's own client dials it on loopback
        return dist.TCPStore("127.0.0.1", int(port), world_size, is_master=True, timeout=timeout, wait_for_workers=False)
    return dist.TCPStore(host, int(port), world_size, is_master=False, timeout=timeout)


class LearnerGroup:
    """This process's place in the group of data-parallel learners."""

    def __init__(self, rank: int, world_size: int, store: dist.Store, device: torch.device = CPU, timeout_s: float = GROUP_TIMEOUT_S):
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's communicator of this rank lives on it
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(distributed_backend(device), store=store, rank=rank, world_size=world_size, timeout=timeout)
        self.rank, self.world_size, self.device, self.store = rank, world_size, device, store
        self.open = True
        self.lost: str | None = None  # why the group ended under this rank, if a rank (or rank 0's store) went away

    def agree(self, going_on: bool) -> bool:
        """True while every rank goes on; the first False (or a rank gone) ends it for all."""
        if not self.open:
            return False
        flag = torch.tensor([1 if going_on else 0], dtype=torch.int32, device=self.device)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        except RuntimeError as e:  # a rank died: its socket closed, or the timeout ran out
            self.gone(e)
            return False
        self.open = bool(flag.item())
        return self.open

    def gone(self, error: RuntimeError) -> None:
        """A collective failed: a rank died (its socket closed) or the timeout ran out. The group is over."""
        log.error("learner group: a rank is gone (%s)", error)
        self.lost = self.lost or f"a rank is gone: {error}"
        self.open = False

    def failed(self, error: BaseException) -> bool:
        """Whether `error` is this group ending under its rank (a learner's other errors are bugs to raise)."""
        return isinstance(error, RuntimeError) and self.lost is not None

    def stopping(self) -> bool:
        """Rank 0 is ending the group, or is gone: a rank waiting for batches should close now
        rather than wait for a batch that will not come."""
        try:
            return self.store.check([STOP_KEY])
        except RuntimeError as e:  # the store went with rank 0
            self.lost = self.lost or f"rank 0's store is gone: {e}"
            return True

    def share_from_rank_0(self, learner: Learner) -> None:
        """Every rank continues from rank 0's learner, bit for bit: parameters, target network,
        optimizer state and update count, whatever each rank resumed (a rank on another host has
        no checkpoint). The state travels as `torch.save` bytes that are loaded with
        `weights_only=True`: tensors and plain values only, no code."""
        if self.rank == 0:
            saved = io.BytesIO()
            torch.save(cpu_state(learner.state_dict()), saved)
            payload = torch.frombuffer(bytearray(saved.getvalue()), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size)
        if self.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._broadcast(payload)
        if self.rank != 0:
            state = torch.load(io.BytesIO(payload.numpy().tobytes()), map_location=learner.device, weights_only=True)
            learner.load_state_dict(state)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's `tensor` into every rank's, in place (through the device: NCCL sends GPU tensors only)."""
        if tensor.device == self.device:
            dist.broadcast(tensor, src=0)
            return
        on_device = tensor.to(self.device)
        dist.broadcast(on_device, src=0)
        tensor.copy_(on_device)

    def close(self) -> None:
        """Leave the group; rank 0 first tells the ranks waiting for batches, and every rank tells
        the others at a last `agree` (unless the group already ended)."""
        if self.rank == 0:
            with contextlib.suppress(RuntimeError):
                self.store.set(STOP_KEY, "1")
        if self.open:
            self.agree(False)
        dist.destroy_process_group()


def average_gradients(network: nn.Module, group: LearnerGroup) -> None:
    """Average the gradients over the group at the end of every backward pass, as one all-reduce of
    all of them flattened (one message where one per parameter cost a scheduler round-trip each on
    a busy machine). Queued from the first gradient accumulated, as DistributedDataParallel does, so
    it runs before the algorithm clips and steps; a parameter without a gradient counts as zero.
    A rank gone mid-update fails the backward pass before the step, and closes `group`
    (`LearnerGroup.failed` tells that error from any other)."""
    parameters = [p for p in network.parameters() if p.requires_grad]
    queued = False

    def all_reduce() -> None:
        nonlocal queued
        queued = False
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        try:
            dist.all_reduce(flat)
        except RuntimeError as e:
            group.gone(e)
            raise
        flat /= group.world_size
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
