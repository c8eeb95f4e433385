"""Acting in a Gymnasium vector env with epsilon-greedy batched action selection (no gRPC here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from titan_rl.envs import make_vector_env
from titan_rl.rollout.nstep import NStepAccumulator


def linear_epsilon(start: float, end: float, decay_steps: int, step: int) -> float:
    if decay_steps <= 0 or step >= decay_steps:
        return end
    return start + (end - start) * step / decay_steps


@dataclass
class StepResult:
    transitions: dict[str, np.ndarray]  # only the rows that are real transitions
    episode_returns: list[float]
    episode_lengths: list[int]


class VectorActor:
    """Steps `num_envs` envs at once; one batched forward picks every greedy action.

    With next-step autoreset, the step after an episode ends only resets that env: its
    row is not a transition and is dropped, so a stored `next_obs` is always the true
    successor (the final observation at an episode's end, never a reset one).
    Transitions are `n_step` steps long (see NStepAccumulator).
    """

    def __init__(self, env_name: str, num_envs: int, policy: nn.Module, seed: int, n_step: int = 1, gamma: float = 0.99):
        self.env = make_vector_env(env_name, num_envs)
        self.policy = policy
        self.num_envs = num_envs
        self.n_actions = int(self.env.single_action_space.n)
        self.rng = np.random.default_rng(seed)
        self.env.action_space.seed(seed)
        self.obs, _ = self.env.reset(seed=seed)
        space = self.env.single_observation_space
        self._nstep = NStepAccumulator(num_envs, n_step, gamma, space.shape, space.dtype)
        self._resetting = np.zeros(num_envs, dtype=bool)
        self._returns = np.zeros(num_envs, dtype=np.float64)
        self._lengths = np.zeros(num_envs, dtype=np.int64)

    def act(self, obs: np.ndarray, epsilon: float) -> np.ndarray:
        with torch.no_grad():
            greedy = self.policy(torch.as_tensor(obs)).argmax(dim=1).numpy()
        explore = self.rng.random(len(obs)) < epsilon
        return np.where(explore, self.rng.integers(0, self.n_actions, len(obs)), greedy)

    def step(self, epsilon: float) -> StepResult:
        actions = self.act(self.obs, epsilon)
        next_obs, reward, terminated, truncated, _ = self.env.step(actions)
        valid = ~self._resetting
        transitions = self._nstep.push(self.obs, actions, reward, next_obs, terminated, truncated, valid)
        self._returns += np.where(valid, reward, 0.0)  # not reward * valid: a reset row's inf * 0 would be nan
        self._lengths += valid
        ended = terminated | truncated
        result = StepResult(transitions, [], [])
        if (done := ended & valid).any():  # most steps end no episode: skip the indexing
            result.episode_returns, result.episode_lengths = self._returns[done].tolist(), self._lengths[done].tolist()
            self._returns[done] = 0.0
            self._lengths[done] = 0
        self._resetting = ended
        self.obs = next_obs
        return result

    def close(self) -> None:
        self.env.close()


def evaluate_greedy(policy: nn.Module, env_name: str, episodes: int, seed: int) -> list[float]:
    """Return of one greedy episode in each of `episodes` envs run side by side."""
    env = make_vector_env(env_name, episodes)
    try:
        obs, _ = env.reset(seed=seed)
        returns = np.zeros(episodes)
        running = np.ones(episodes, dtype=bool)
        while running.any():
            with torch.no_grad():
                actions = policy(torch.as_tensor(obs)).argmax(dim=1).numpy()
            obs, reward, terminated, truncated, _ = env.step(actions)
            returns += reward * running
            running &= ~(terminated | truncated)
        return returns.tolist()
    finally:
        env.close()
