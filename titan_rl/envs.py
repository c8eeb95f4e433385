"""Gymnasium environments by name: space checks and vector envs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from titan_rl.algorithm import EnvSpec
from titan_rl.config import Config
from titan_rl.errors import ConfigError


def make_vector_env(env_name: str, num_envs: int) -> gym.vector.VectorEnv:
    """The env's own vectorised implementation where it has one, else a SyncVectorEnv; next-step autoreset."""
    env = gym.make_vec(env_name, num_envs=num_envs)
    mode = env.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
    if mode != gym.vector.AutoresetMode.NEXT_STEP:
        env.close()
        raise ConfigError(f"rollout_server.env_name={env_name!r}: vector autoreset mode {mode} is not supported (need NEXT_STEP)")
    return env


def env_spec(cfg: Config) -> EnvSpec:
    """Observation shape and dtype and action count of the configured env; ConfigError if unsupported."""
    obs_shape, obs_dtype, n_actions = check_env_spaces(cfg)
    return EnvSpec(obs_shape, obs_dtype, n_actions)


def check_env_spaces(cfg: Config) -> tuple[tuple[int, ...], np.dtype, int]:
    """(observation shape, observation dtype, action count) of the configured env; ConfigError if unsupported."""
    name = cfg.rollout_server.env_name
    try:
        env = gym.make(name)
    except (gym.error.Error, ImportError) as e:  # ImportError: the module of a `module:EnvId`
        raise ConfigError(f"rollout_server.env_name={name!r}: {e}") from e
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    if not isinstance(obs_space, gym.spaces.Box) or not isinstance(act_space, gym.spaces.Discrete):
        raise ConfigError(
            f"rollout_server.env_name={name!r} has {type(obs_space).__name__} observations and "
            f"{type(act_space).__name__} actions; TITAN-RL supports Box observations and Discrete actions"
        )
    return tuple(obs_space.shape), np.dtype(obs_space.dtype), int(act_space.n)
