"""Gymnasium environments by name: space checks and vector envs (no torch here, so light to import)."""

from __future__ import annotations

import gymnasium as gym

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


def check_env_spaces(cfg: Config) -> tuple[tuple[int, ...], int]:
    """Observation shape and action count of the configured env; raises ConfigError if unsupported."""
    name = cfg.rollout_server.env_name
    try:
        env = gym.make(name)
    except gym.error.Error as e:
        raise ConfigError(f"rollout_server.env_name={name!r}: {e}") from e
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    if not isinstance(obs_space, gym.spaces.Box) or not isinstance(act_space, gym.spaces.Discrete):
        raise ConfigError(
            f"rollout_server.env_name={name!r} has {type(obs_space).__name__} observations and "
            f"{type(act_space).__name__} actions; DQN needs Box observations and Discrete actions"
        )
    return tuple(obs_space.shape), int(act_space.n)
