"""Clients of the trainer service: the weight subscription actors use, and control calls."""

from __future__ import annotations

import logging
import threading
import time
from typing import NamedTuple

import grpc
import torch

from titan_rl import wire
from titan_rl.errors import PeerUnavailableError
from titan_rl.rpc import REFUSED_FOR_GOOD, RETRYABLE, Backoff, make_channel, wait_until_ready
from titan_rl.v1 import trainer_pb2, trainer_pb2_grpc

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 2.0  # the subscriber's thread notices a stop within READY_POLL_S


class Weights(NamedTuple):
    version: int
    env_steps: int  # buffer-wide env steps when they were published
    state: dict[str, torch.Tensor]


class PolicySubscriber:
    """Follows the trainer's WatchPolicy stream from a background thread.

    Only the newest weights are kept; `take()` hands them over once, so the actor
    can swap weights between two env steps (never mid-batch). A dropped stream is
    reopened with back-off, asking only for versions newer than the last one seen (of the
    same trainer epoch: a restarted trainer's weights are taken whatever their version).
    `finished` is set when the trainer says the run has ended; `gone` when it stayed
    unreachable for `peer_timeout_s` (None: wait forever); `refused` (with why) when it refused
    the stream for good (REFUSED_FOR_GOOD: a wrong token, or another service's address), which
    a new worker would get too.
    """

    def __init__(self, address: str, peer_timeout_s: float | None = None):
        self.address = address
        self.peer_timeout_s = peer_timeout_s
        self.version = -1
        self.epoch = 0
        self.finished = threading.Event()
        self.gone = threading.Event()
        self.refused = threading.Event()
        self.refusal = ""
        self._latest: Weights | None = None
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self._stop = threading.Event()
        self._channel = make_channel(address)
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)
        self._call = None
        self._thread = threading.Thread(target=self._run, name="policy-subscriber", daemon=True)
        self._thread.start()

    def take(self) -> Weights | None:
        with self._lock:
            latest, self._latest = self._latest, None
        return latest

    def wait_first(self, timeout_s: float | None = None) -> bool:
        return self._arrived.wait(timeout_s)

    def _run(self) -> None:
        backoff = Backoff()
        contact = time.monotonic()  # the trainer counts as gone peer_timeout_s after the last sign of it
        while not self._stop.is_set():
            try:
                if not wait_until_ready(self._channel, contact, self.peer_timeout_s, self._stop, f"trainer {self.address}"):
                    return
            except PeerUnavailableError as e:
                log.error("%s", e)
                self.gone.set()
                return
            request = trainer_pb2.WatchPolicyRequest(after_version=self.version, epoch=self.epoch)
            try:
                self._call = self._stub.WatchPolicy(request, wait_for_ready=True)
                for reply in self._call:
                    if reply.run_finished:
                        log.info("trainer %s: the run has finished", self.address)
                        self.finished.set()
                        return
                    weights = reply.weights
                    state = {k: torch.from_numpy(a.copy()) for k, a in wire.decode_weights(weights).items()}
                    with self._lock:
                        self._latest = Weights(weights.version, weights.env_steps, state)
                        self.version, self.epoch = weights.version, weights.epoch
                    self._arrived.set()
                    backoff.reset()
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                if e.code() in REFUSED_FOR_GOOD:
                    self.refusal = f"trainer {self.address} refused the policy stream: {e.code().name}: {e.details()}"
                    self.refused.set()
                    return
                level = logging.WARNING if e.code() in RETRYABLE else logging.ERROR
                log.log(level, "policy stream from %s: %s; retrying in %.1fs", self.address, e.code().name, backoff.delay_s)
            contact = time.monotonic()
            if not self._stop.is_set():
                backoff.sleep()

    def ended(self) -> bool:
        """Whether no more weights will come: the run finished, or the trainer is gone or refused us."""
        return self.finished.is_set() or self.gone.is_set() or self.refused.is_set()

    def close(self) -> None:
        """Stop the thread, then close the channel: closing it under a call in flight can crash gRPC at exit."""
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(JOIN_TIMEOUT_S)
        self._channel.close()


class TrainerClient:
    def __init__(self, address: str, timeout_s: float = 10.0):
        self.timeout_s = timeout_s
        self._channel = make_channel(address)
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)

    def status(self) -> trainer_pb2.StatusResponse:
        return self.stub.Status(trainer_pb2.StatusRequest(), timeout=self.timeout_s)

    def stop(self) -> None:
        self.stub.Stop(trainer_pb2.StopRequest(), timeout=self.timeout_s)

    def checkpoint(self, path: str = "") -> str:
        """Write the learner now: to `<checkpoint stem>_last.pth`, or to the file name `path` beside the
        configured checkpoint (never over the kept best one); returns where it went."""
        return self.stub.Checkpoint(trainer_pb2.CheckpointRequest(path=path), timeout=60).path

    def close(self) -> None:
        self._channel.close()
