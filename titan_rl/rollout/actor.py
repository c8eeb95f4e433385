"""Acting in a Gymnasium vector env with an algorithm's acting policy and adder (no gRPC here)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from titan_rl.algorithm import Actor, Adder, EnvStep
from titan_rl.envs import make_vector_env


@dataclass
class StepResult:
    records: dict[str, np.ndarray]  # what the adder completed this step (possibly zero rows)
    env_steps: int  # valid env steps taken (reset-only rows do not count)
    episode_returns: list[float]
    episode_lengths: list[int]


class VectorActor:
    """Steps `num_envs` envs at once with `actor.act` (one batched forward) and feeds `adder`.

    With next-step autoreset, the step after an episode ends only resets that env: its row is
    passed to the adder as not valid, so a stored `next_obs` is always the true successor (the
    final observation at an episode's end, never a reset one).
    """

    def __init__(self, env_name: str, num_envs: int, actor: Actor, adder: Adder, seed: int):
        self.env = make_vector_env(env_name, num_envs)
        self.actor, self.adder = actor, adder
        self.num_envs = num_envs
        self.env.action_space.seed(seed)
        self.obs, _ = self.env.reset(seed=seed)
        self._resetting = np.zeros(num_envs, dtype=bool)
        self._returns = np.zeros(num_envs, dtype=np.float64)
        self._lengths = np.zeros(num_envs, dtype=np.int64)

    def step(self) -> StepResult:
        actions, extras = self.actor.act(self.obs)
        next_obs, reward, terminated, truncated, _ = self.env.step(actions)
        valid = ~self._resetting
        records = self.adder.add(EnvStep(self.obs, actions, reward, next_obs, terminated, truncated, valid, extras))
        self._returns += np.where(valid, reward, 0.0)  # not reward * valid: a reset row's inf * 0 would be nan
        self._lengths += valid
        ended = terminated | truncated
        result = StepResult(records, int(valid.sum()), [], [])
        if (done := ended & valid).any():  # most steps end no episode: skip the indexing
            result.episode_returns, result.episode_lengths = self._returns[done].tolist(), self._lengths[done].tolist()
            self._returns[done] = 0.0
            self._lengths[done] = 0
        self._resetting = ended
        self.obs = next_obs
        return result

    def close(self) -> None:
        self.env.close()
