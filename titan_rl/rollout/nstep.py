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
        self._t = 0
        # Every window that can end at a step, one per row: the full one, then 1, 2, ..., n-1 steps
        # (those only at a termination). Row r covers the last _window_steps[r] of the n steps held.
        self._window_steps = np.array([n, *range(1, n)])
        first = n - self._window_steps[:, None]  # oldest-first position of each row's first step
        k = np.arange(n)[None, :]
        self._window_discounts = np.where(k >= first, gamma ** np.maximum(k - first, 0), 0.0)  # [row, position]

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
        """Add one vector step (rows where `valid` is False are autoreset steps, not transitions).

        Every window ending here is found and read at once, with no loop over window lengths:
        this runs once per env step, so its numpy call count is the actor's overhead.
        """
        n, t = self.n, self._t
        self._obs[t % n], self._action[t % n], self._reward[t % n] = obs, action, reward
        if not valid.all():  # a new episode: the matmul below weighs its stale rewards by 0, and 0 * inf is nan
            self._reward[:, ~valid] = 0.0
        self._episode_len = np.where(valid, self._episode_len + 1, 0)
        self._t += 1

        positions = (t + 1 + np.arange(n)) % n  # ring slots, oldest first
        lengths = self._window_steps[:, None]
        # [row, env]; invalid rows need no mask of their own: their episode length is 0
        ends = (self._episode_len >= lengths) & ((lengths == n) | terminated)
        row, env = np.nonzero(ends)
        start = positions[n - self._window_steps[row]]
        rewards = self._window_discounts @ self._reward[positions]  # [row, env]
        return {
            "obs": self._obs[start, env],
            "action": self._action[start, env],
            "reward": rewards[row, env].astype(np.float32),
            "next_obs": next_obs[env],
            "terminated": terminated[env].astype(bool),
            "truncated": truncated[env].astype(bool),
        }
