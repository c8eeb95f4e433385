"""TITAN-RL: distributed DQN as three gRPC services (rollout, buffer, trainer)."""
