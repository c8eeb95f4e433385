"""Build user classes named by dotted path in YAML (`path: models.simple_policy.SimplePolicy`).

This is the only way the framework reaches `models/` and `trainers/`: by name, checked to be
the kind of class expected before it is called.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any

from torch import nn

from titan_rl.config import ClassSpec, Config
from titan_rl.errors import ConfigError, ModuleNotAllowedError

if TYPE_CHECKING:
    from titan_rl.algorithm import Algorithm, EnvSpec

CHECKPOINT_MODULES = ("models", "trainers")
"""Packages a class path read from a checkpoint may name: importing a module runs its code."""


def check_module_allowed(path: str, what: str, allowed_modules: tuple[str, ...]) -> None:
    """Refuse a dotted path outside `allowed_modules` (top-level package names) before anything is imported."""
    top = path.split(".", 1)[0]
    if not all(part.isidentifier() for part in path.split(".")):
        raise ConfigError(f"{what}={path!r} is not a dotted path of Python names")
    if top not in allowed_modules:
        allowed = ", ".join(f"{m}." for m in allowed_modules)
        raise ModuleNotAllowedError(f"{what}={path!r} is not allowed here: only classes under {allowed}", top)


ENV_MODULES = ("titan_rl.minatar_envs",)
"""Modules an env id read from a checkpoint may name besides CHECKPOINT_MODULES' (`module:EnvId` imports `module`)."""


def check_env_module_allowed(env_name: str, what: str, allowed_modules: tuple[str, ...]) -> None:
    """Refuse an env id `module:EnvId` (which Gymnasium's make imports) whose module is neither one of
    ENV_MODULES nor under `allowed_modules`, before anything is imported."""
    module, colon, _ = env_name.partition(":")
    if not colon or module in ENV_MODULES:
        return
    if not all(part.isidentifier() for part in module.split(".")):
        raise ConfigError(f"{what}={env_name!r}: {module!r} is not a dotted module path of Python names")
    if module.split(".", 1)[0] not in allowed_modules:
        allowed = ", ".join([*ENV_MODULES, *(f"{m}." for m in allowed_modules)])
        raise ModuleNotAllowedError(
            f"{what}={env_name!r} imports module {module!r}, which is not allowed here: only {allowed}", module.split(".", 1)[0]
        )


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


def import_class(path: str, what: str, base: type) -> type:
    """`import_object`, checked to be a subclass of `base` before anyone calls it."""
    obj = import_object(path, what)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{what}.path={path!r} is not a subclass of {base.__module__}.{base.__qualname__}")
    if inspect.isabstract(obj):  # a hook misspelled or missing: say which, rather than Python's "Can't instantiate"
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise ConfigError(f"{what}.path={path!r}: {obj.__name__} does not define {missing}, which {base.__name__} requires")
    return obj


def build(spec: ClassSpec, what: str, base: type, *args: Any, **extra: Any) -> Any:
    cls = import_class(spec.path, what, base)
    try:
        return cls(*args, **spec.kwargs, **extra)
    except (TypeError, ValueError, RuntimeError) as e:  # a wrong or out-of-range kwarg, e.g. a negative layer size in torch
        raise ConfigError(f"{what}: cannot build {spec.path} with kwargs {spec.kwargs}: {type(e).__name__}: {e}") from e


def build_policy(cfg: Config) -> nn.Module:
    """The network named by `policy.path`, untrained."""
    return build(cfg.policy, "policy", nn.Module)


def algorithm_class(path: str, where: str = "algorithm") -> type[Algorithm]:
    from titan_rl.algorithm import Algorithm

    return import_class(path, f"{where}: algorithm", Algorithm)


def build_algorithm(cfg: Config, env: EnvSpec | None = None) -> Algorithm:
    """The configured algorithm for the configured env (its spaces read from Gymnasium unless given)."""
    from titan_rl.envs import env_spec

    return algorithm_class(cfg.algorithm.path)(cfg, env or env_spec(cfg))
