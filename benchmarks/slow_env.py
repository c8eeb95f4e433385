"""CartPole whose every step also waits `TITAN_RL_SLOW_STEP_MS` milliseconds (default 1) without
using the CPU: a stand-in for environments bound by something other than this machine's cores (a
simulator elsewhere, a robot, I/O), which is when more actors help. Named in a config as
`benchmarks.slow_env:SlowCartPole-v1` (Gymnasium imports this module, which registers it)."""

from __future__ import annotations

import os
import time

import gymnasium as gym
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

STEP_MS_ENV = "TITAN_RL_SLOW_STEP_MS"


class SlowCartPole(CartPoleEnv):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.step_s = float(os.environ.get(STEP_MS_ENV, "1")) / 1000

    def step(self, action):
        time.sleep(self.step_s)
        return super().step(action)


gym.register("SlowCartPole-v1", entry_point=SlowCartPole, max_episode_steps=500)
