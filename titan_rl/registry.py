"""Build user classes named by dotted path in YAML (`path: models.simple_policy.SimplePolicy`)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import torch
from torch import nn

from titan_rl.config import ClassSpec, Config
from titan_rl.errors import ConfigError


def import_object(path: str, what: str) -> Any:
    """`package.module.Name` -> the object. The working directory is importable, so a user's own module works."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what}.path={path!r}: cannot import module {module_name!r}: {e}") from e
    try:
        return getattr(module, name)
    except AttributeError as e:
        raise ConfigError(f"{what}.path={path!r}: module {module_name!r} has no {name!r}") from e


def build(spec: ClassSpec, what: str, *args: Any, **extra: Any) -> Any:
    cls = import_object(spec.path, what)
    try:
        return cls(*args, **spec.kwargs, **extra)
    except TypeError as e:
        raise ConfigError(f"{what}: cannot build {spec.path} with kwargs {spec.kwargs}: {e}") from e


def build_policy(cfg: Config) -> nn.Module:
    policy = build(cfg.policy, "policy")
    if not isinstance(policy, nn.Module):
        raise ConfigError(f"policy.path={cfg.policy.path!r} is not a torch.nn.Module")
    return policy


def check_policy_fits(policy: nn.Module, obs_shape: tuple[int, ...], n_actions: int, where: str = "policy") -> None:
    """One dummy forward: the policy must map [B, *obs_shape] to [B, n_actions]."""
    with torch.no_grad():
        try:
            out = policy(torch.zeros((2, *obs_shape)))
        except RuntimeError as e:
            raise ConfigError(f"{where}: does not accept observations of shape {obs_shape}: {e}") from e
    if tuple(out.shape) != (2, n_actions):
        raise ConfigError(f"{where}: maps a batch of 2 observations to shape {tuple(out.shape)}, expected (2, {n_actions})")
