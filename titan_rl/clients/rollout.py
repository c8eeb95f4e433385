"""Client of the rollout service's Stats call."""

from __future__ import annotations

import grpc

from titan_rl.rpc import make_channel
from titan_rl.v1 import rollout_pb2, rollout_pb2_grpc


class RolloutClient:
    def __init__(self, address: str, timeout_s: float = 1.0):
        self.timeout_s = timeout_s
        self._channel = make_channel(address)
        self.stub = rollout_pb2_grpc.RolloutServiceStub(self._channel)

    def stats(self) -> rollout_pb2.StatsResponse | None:
        """The latest statistics, or None if the rollout service does not answer in time."""
        try:
            return self.stub.Stats(rollout_pb2.StatsRequest(), timeout=self.timeout_s)
        except grpc.RpcError:
            return None

    def close(self) -> None:
        self._channel.close()
