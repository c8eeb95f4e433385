"""Rollout service: worker processes that act in Gymnasium vector envs and feed the buffer."""
