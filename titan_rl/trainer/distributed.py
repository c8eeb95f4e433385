"""Data-parallel learners on torch.distributed: `train.learners` processes, each with its own
sample stream from the buffer, averaging gradients so that every optimizer step sees the combined
batch. Rank 0 is the trainer service (it publishes weights, evaluates and checkpoints); ranks 1..N-1
are learner processes (titan_rl.trainer.ranks), on the trainer's host or on hosts of their own.
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
import os
import socket

import torch
import torch.distributed as dist
from torch import nn

from titan_rl.algorithm import Learner, cpu_state
from titan_rl.errors import ConfigError
from titan_rl.trainer.device import distributed_backend

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
GROUP_TIMEOUT_S = 300.0  # a collective (or a rank's first contact) that waits this long raises instead of hanging
STOP_KEY = "titan_rl/stop"  # rank 0 sets it to END or PAUSE before its closing agree
BACKEND_KEY = "titan_rl/backend"
END, PAUSE = "end", "pause"  # the run is over / only this trainer stopped: the run resumes with a new one


def group_store(address: str, rank: int, world_size: int, timeout_s: float = GROUP_TIMEOUT_S) -> dist.TCPStore:
    """Where the ranks meet. Rank 0 serves it at `address`'s port: on every interface when the ranks
    are on other hosts, on loopback only for `127.0.0.1:0` (a free local port, `.port` says which).
    The others dial `address`, retrying until rank 0 is up or `timeout_s` ends."""
    host, _, port = address.rpartition(":")
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank != 0:
        log.info("learner rank %d: joining the learner group at %s (waiting up to %.0fs for the trainer)", rank, address, timeout_s)
        return dist.TCPStore(host, int(port), world_size, is_master=False, timeout=timeout)
    listen_fd = None
    if host == "127.0.0.1":  # local ranks only: nobody else on the network may join or stop the group
        listener = socket.create_server(("127.0.0.1", int(port)))
        port, listen_fd = listener.getsockname()[1], listener.detach()  # the store owns the socket from here
    return dist.TCPStore(
        "127.0.0.1", int(port), world_size, is_master=True, timeout=timeout, wait_for_workers=False, master_listen_fd=listen_fd
    )  # rank 0's own client dials its server on loopback


LOOPBACK_INTERFACES = ("lo", "lo0")  # Linux, the BSDs and macOS


def gloo_on_loopback() -> None:
    """Make gloo's sockets in this process listen on loopback. By default gloo listens on the address
    the host's name resolves to, which on most hosts is on the network, and it carries no token: a
    group whose ranks all run on this host has no reason to be reachable from elsewhere."""
    names = [name for _, name in socket.if_nameindex()]
    loopback = next((name for name in LOOPBACK_INTERFACES if name in names), None)
    if loopback is None:
        log.warning("no loopback interface among %s: gloo listens on the address this host's name resolves to", names)
        return
    os.environ["GLOO_SOCKET_IFNAME"] = loopback


class LearnerGroup:
    """This process's place in the group of data-parallel learners.

    The gradients travel over the device's backend (NCCL between GPUs); the control messages (the
    agree before each update, rank 0's state at the start) over gloo on the CPU, where a rank that
    is gone shows as an error at once instead of a hang until the timeout."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        store: dist.Store,
        device: torch.device = CPU,
        timeout_s: float = GROUP_TIMEOUT_S,
        loopback: bool = False,
    ):
        """`loopback`: every rank runs on this host, so gloo listens on loopback only (`gloo_on_loopback`)."""
        backend = distributed_backend(device)
        if loopback:
            gloo_on_loopback()
        if rank == 0:
            store.set(BACKEND_KEY, backend)
        elif (expected := store.get(BACKEND_KEY).decode()) != backend:
            raise ConfigError(
                f"train.device: learner rank {rank} would talk {backend} ({device}), rank 0 talks {expected}: "
                "give every learner host the same device"
            )
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        self.control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
        self.rank, self.world_size, self.device, self.store = rank, world_size, device, store
        self.open = True
        self.agreed_env_steps = 0
        self.closed = False
        self.lost: str | None = None  # why the group ended under this rank, if a rank (or rank 0's store) went away

    def agree(self, going_on: bool, env_steps: int = 0) -> bool:
        """True while every rank goes on; the first False (or a rank gone) ends it for all.

        Rank 0 also brings the run's env-step count (the other ranks' `env_steps` is ignored): it
        becomes every rank's `agreed_env_steps`, the one clock their learners' schedules run on, so
        their updates stay equal and follow the count the actors' exploration follows."""
        if not self.open:
            return False
        clock = env_steps if self.rank == 0 else torch.iinfo(torch.int64).max  # the MIN picks rank 0's
        flags = torch.tensor([1 if going_on else 0, clock], dtype=torch.int64)
        try:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.control)
        except RuntimeError as e:  # a rank died: its socket closed, or the timeout ran out
            self.gone(e)
            return False
        self.open = bool(flags[0])
        self.agreed_env_steps = int(flags[1])
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

    def run_ended(self) -> bool:
        """After the group ended under a rank >= 1: whether rank 0 ended the run (else only that
        trainer stopped, or a rank was lost, and the run goes on with a new group)."""
        if self.lost is not None:
            return False
        try:
            return self.store.get(STOP_KEY).decode() == END
        except RuntimeError:  # rank 0 left before this rank asked: it had said so at the agree
            return False

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
        dist.broadcast(size, src=0, group=self.control)
        if self.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(payload, src=0, group=self.control)
        if self.rank != 0:
            state = torch.load(io.BytesIO(payload.numpy().tobytes()), map_location="cpu", weights_only=True)
            try:  # load_state_dict moves each tensor to where its parameter is
                learner.load_state_dict(state)
            except (RuntimeError, KeyError, ValueError) as e:
                raise ConfigError(
                    f"learner rank {self.rank}: its config builds another learner than rank 0's ({e}): give every rank the same config"
                ) from e

    def close(self, run_ended: bool = True) -> None:
        """Leave the group (once); rank 0 first tells every rank whether the run ended, which a rank
        waiting for batches reads from the store, and every rank tells the others at a last `agree`
        (unless the group already ended)."""
        if self.closed:
            return
        self.closed = True
        if self.rank == 0:
            with contextlib.suppress(RuntimeError):
                self.store.set(STOP_KEY, END if run_ended else PAUSE)
        if self.open:
            self.agree(False)
        if self.lost is None:  # gloo can abort the process tearing down a group whose peer died mid-collective
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
