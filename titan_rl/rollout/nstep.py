"""n-step transitions from a vector env's one-step ones (pure numpy, no gRPC, no torch)."""

from __future__ import annotations

import numpy as np


class NStepAccumulator:
    """Keeps the last `n` steps of every env and emits n-step transitions.

    A transition starting at step t carries `reward = r_t + g r_{t+1} + ... + g^(n-1) r_{t+n-1}` and
    `next_obs = obs_{t+n}`, so a learner bootstraps with `g^n` unless `terminated`. At a termination
    the shorter windows ending there are emitted too (they never bootstrap, so their length does
    not matter). At a truncation only complete windows are kept: a shorter one would need a
    `g^m` the learner does not know, and the few dropped steps are ordinary states.
    With n=1 this is the identity on valid rows.
    """

    def __init__(self, num_envs: int, n: int, gamma: float, obs_shape: tuple[int, ...], obs_dtype: np.dtype):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.gamma = n, gamma
        self._obs = np.zeros((n, num_envs, *obs_shape), dtype=obs_dtype)
        self._action = np.zeros((n, num_envs), dtype=np.int64)
        self._reward = np.zeros((n, num_envs), dtype=np.float64)
        self._episode_len = np.zeros(num_envs, dtype=np.int64)  # steps of the running episode seen so far
        self._discounts = gamma ** np.arange(n)
        self._t = 0

    def push(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        valid: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Add one vector step (rows where `valid` is False are autoreset steps, not transitions)."""
        n, t = self.n, self._t
        slot = t % n
        self._obs[slot], self._action[slot], self._reward[slot] = obs, action, reward
        self._episode_len = np.where(valid, self._episode_len + 1, 0)
        self._t += 1

        order = [(t - n + 1 + k) % n for k in range(n)]  # oldest first
        full = valid & (self._episode_len >= n)
        parts = [self._windows(order, full, next_obs, terminated[full], truncated)]
        ended = valid & terminated
        if ended.any():
            for m in range(1, n):  # windows of m < n steps ending at a termination, every such env at once
                envs = ended & (self._episode_len >= m)
                if envs.any():
                    steps = [(t - m + 1 + k) % n for k in range(m)]
                    parts.append(self._windows(steps, envs, next_obs, np.ones(envs.sum(), dtype=bool), truncated))
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _windows(
        self, steps: list[int], envs: np.ndarray, next_obs: np.ndarray, terminated: np.ndarray, truncated: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Transitions of the given envs over the ring `steps` (oldest first), ending at `next_obs`."""
        rewards = self._reward[steps][:, envs] * self._discounts[: len(steps), None]
        return {
            "obs": self._obs[steps[0]][envs],
            "action": self._action[steps[0]][envs],
            "reward": rewards.sum(axis=0).astype(np.float32),
            "next_obs": next_obs[envs],
            "terminated": terminated.astype(bool),
            "truncated": truncated[envs].astype(bool),
        }
