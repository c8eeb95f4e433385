"""Adders: turn a vector env's steps into records (pure numpy, no gRPC, no torch).

`NStepAdder` writes n-step transitions (DQN and its kin); `SegmentAdder` writes fixed-length
trajectory segments. Both carry the actor's per-step extras, such as behaviour log-probs (IMPALA).
"""

from __future__ import annotations

import numpy as np

from titan_rl.algorithm import Adder, EnvStep, RecordSpec
from titan_rl.errors import ConfigError


class NStepAccumulator:
    """Keeps the last `n` steps of every env and emits n-step transitions.

    A transition starting at step t carries `reward = r_t + g r_{t+1} + ... + g^(n-1) r_{t+n-1}` and
    `next_obs = obs_{t+n}`, so a learner bootstraps with `g^n` unless `terminated`. At a termination
    the shorter windows ending there are emitted too (they never bootstrap, so their length does
    not matter). At a truncation only complete windows are kept: a shorter one would need a
    `g^m` the learner does not know, and the few dropped steps are ordinary states.
    With n=1 this is the identity on valid rows.
    """

    def __init__(
        self, num_envs: int, n: int, gamma: float, obs_shape: tuple[int, ...], obs_dtype: np.dtype, extras: RecordSpec | None = None
    ):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.gamma = n, gamma
        self._obs = np.zeros((n, num_envs, *obs_shape), dtype=obs_dtype)
        self._action = np.zeros((n, num_envs), dtype=np.int64)
        self._reward = np.zeros((n, num_envs), dtype=np.float64)
        with_extras(transition_spec(obs_shape, obs_dtype), extras or {})  # an extra named as a field it writes is refused
        self._extras = {name: np.zeros((n, num_envs, *shape), dtype) for name, (shape, dtype) in (extras or {}).items()}
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
        extras: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Add one vector step (rows where `valid` is False are autoreset steps, not transitions),
        with the actor's `extras` of this step for the extras given at construction.

        Every window ending here is found and read at once, with no loop over window lengths:
        this runs once per env step, so its numpy call count is the actor's overhead.
        """
        n, t = self.n, self._t
        self._obs[t % n], self._action[t % n], self._reward[t % n] = obs, action, reward
        for name, ring in self._extras.items():
            if extras is None or name not in extras:
                raise KeyError(f"extras: the actor returned no {name!r}, which the records declare")
            ring[t % n] = extras[name]
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
            **{name: ring[start, env] for name, ring in self._extras.items()},
        }


def transition_spec(obs_shape: tuple[int, ...], obs_dtype: np.dtype) -> RecordSpec:
    """The record of an n-step transition: what `NStepAdder` writes."""
    return {
        "obs": (obs_shape, np.dtype(obs_dtype)),
        "action": ((), np.dtype(np.int64)),
        "reward": ((), np.dtype(np.float32)),
        "next_obs": (obs_shape, np.dtype(obs_dtype)),
        "terminated": ((), np.dtype(bool)),
        "truncated": ((), np.dtype(bool)),
    }


class NStepAdder(Adder):
    """n-step transitions of every env (see NStepAccumulator), each with the `extras` the actor
    returned at its first step: the step whose action the transition records (an actor-side
    priority, the action values or log-probability of that action)."""

    def __init__(
        self, num_envs: int, n: int, gamma: float, obs_shape: tuple[int, ...], obs_dtype: np.dtype, extras: RecordSpec | None = None
    ):
        self.accumulator = NStepAccumulator(num_envs, n, gamma, obs_shape, obs_dtype, extras or {})

    def add(self, step: EnvStep) -> dict[str, np.ndarray]:
        return self.accumulator.push(
            step.obs, step.action, step.reward, step.next_obs, step.terminated, step.truncated, step.valid, step.extras
        )


def with_extras(spec: RecordSpec, extras: RecordSpec) -> RecordSpec:
    """`spec` and the actor's `extras`; ConfigError if an extra is named as a field of `spec`, which it
    would silently replace (an extra named `reward` overwrote the n-step return)."""
    if clash := sorted(set(spec) & set(extras)):
        raise ConfigError(f"extras: {', '.join(clash)} already names a field of the records ({', '.join(spec)}); name the extra otherwise")
    return {**spec, **extras}


def segment_spec(length: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype, extras: RecordSpec) -> RecordSpec:
    """The record of a `length`-step segment: every one-step field with a leading time axis, plus `extras` per step."""
    one_step = with_extras(transition_spec(obs_shape, obs_dtype), extras)
    return {name: ((length, *shape), dtype) for name, (shape, dtype) in one_step.items()}


class SegmentAdder(Adder):
    """Fixed-length segments of consecutive valid steps of one env each.

    Each stored step keeps its own true `next_obs`, so a segment may cross episode ends: a
    learner cuts its returns at `terminated | truncated` and bootstraps a truncation from
    that step's `next_obs`. Reset steps (not valid) are skipped. Every env fills its own
    segment; a full one is emitted and the next starts empty, so no step is stored twice.
    """

    def __init__(self, num_envs: int, length: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype, extras: RecordSpec):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length = length
        spec = segment_spec(length, obs_shape, obs_dtype, extras)
        self._buffers = {name: np.zeros((num_envs, *shape), dtype) for name, (shape, dtype) in spec.items()}
        self._filled = np.zeros(num_envs, dtype=np.int64)
        self._extra_names = tuple(extras)

    def add(self, step: EnvStep) -> dict[str, np.ndarray]:
        env = np.flatnonzero(step.valid)
        t = self._filled[env]
        values = {
            "obs": step.obs,
            "action": step.action,
            "reward": step.reward,
            "next_obs": step.next_obs,
            "terminated": step.terminated,
            "truncated": step.truncated,
            **{name: step.extras[name] for name in self._extra_names},
        }
        for name, buf in self._buffers.items():
            buf[env, t] = values[name][env]
        self._filled[env] += 1
        full = np.flatnonzero(self._filled == self.length)
        self._filled[full] = 0
        return {name: buf[full] for name, buf in self._buffers.items()}  # fancy indexing copies
