"""gRPC face of the trainer: status, weights for actors, checkpoints on demand, stop."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from titan_rl.checkpoint import requested_path
from titan_rl.errors import TitanError
from titan_rl.trainer.loop import TrainingLoop
from titan_rl.trainer.policy_store import PolicyStore
from titan_rl.v1 import trainer_pb2, trainer_pb2_grpc

log = logging.getLogger(__name__)

WATCH_POLL_S = 1.0


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, loop: TrainingLoop, store: PolicyStore):
        self.loop = loop
        self.store = store

    def Status(self, request: trainer_pb2.StatusRequest, context: grpc.ServicerContext) -> trainer_pb2.StatusResponse:
        return trainer_pb2.StatusResponse(**self.loop.status())

    def GetPolicy(self, request: trainer_pb2.GetPolicyRequest, context: grpc.ServicerContext) -> trainer_pb2.GetPolicyResponse:
        weights = self.store.latest()
        if weights is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no weights published yet")
        return trainer_pb2.GetPolicyResponse(weights=weights)

    def WatchPolicy(
        self, request: trainer_pb2.WatchPolicyRequest, context: grpc.ServicerContext
    ) -> Iterator[trainer_pb2.WatchPolicyResponse]:
        after, epoch = request.after_version, request.epoch
        while context.is_active():
            weights = self.store.wait_newer(after, WATCH_POLL_S, epoch)
            if weights is not None:
                after, epoch = weights.version, weights.epoch
                yield trainer_pb2.WatchPolicyResponse(weights=weights)
            elif self.store.finished:
                yield trainer_pb2.WatchPolicyResponse(run_finished=True)
                return

    def Checkpoint(self, request: trainer_pb2.CheckpointRequest, context: grpc.ServicerContext) -> trainer_pb2.CheckpointResponse:
        try:
            written = self.loop.save(requested_path(request.path, self.loop.cfg.logging.checkpoint_path))
        except TitanError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"path: {e}")
        log.info("checkpoint written to %s on request", written)
        return trainer_pb2.CheckpointResponse(path=str(written))

    def Stop(self, request: trainer_pb2.StopRequest, context: grpc.ServicerContext) -> trainer_pb2.StopResponse:
        log.info("stop requested by %s", context.peer())
        self.loop.stop()
        return trainer_pb2.StopResponse()
