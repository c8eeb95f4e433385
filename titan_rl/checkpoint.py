"""checkpoint.pth: everything needed to rebuild and run a policy, loadable without executing code."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from titan_rl.algorithm import Algorithm, cpu_state
from titan_rl.config import RUN_NAME, Config, config_from_dict, shareable_config_dict
from titan_rl.errors import TitanError
from titan_rl.registry import CHECKPOINT_MODULES, build_algorithm, build_policy

FORMAT = "titan-rl-checkpoint/2"
OLD_FORMATS = {"titan-rl-checkpoint/1": "written before algorithms were plugins (trainer.path): retrain, or use the release that wrote it"}


def save_checkpoint(
    path: str | Path,
    cfg: Config,
    learner_state: dict[str, Any],
    counters: dict[str, float],
    eval_returns: list[float] | None,
) -> Path:
    """Write atomically (temp file + rename), so a reader never sees half a checkpoint."""
    path = Path(path)
    learner_state = cpu_state(learner_state)  # loads on any host, GPU or not
    payload = {
        "format": FORMAT,
        "config": shareable_config_dict(cfg),  # a checkpoint is handed around: never with the run's token
        "policy": learner_state["policy"],
        "learner": learner_state,
        "counters": dict(counters),
        "eval_returns": list(eval_returns or []),
    }
    if "\0" in str(path):
        raise TitanError(f"checkpoint path {str(path)!r} contains a NUL byte")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports file errors as RuntimeError
        with contextlib.suppress(OSError):  # a half-written temp file must not stay behind
            tmp.unlink(missing_ok=True)
        raise TitanError(f"cannot write checkpoint {path}: {e}") from e
    return path


CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,235}\.pth")
"""A name a Checkpoint call may give: one file, no folder, nothing hidden, with room left for
`save_checkpoint`'s temporary name in a file system's 255 bytes."""


def requested_path(requested: str, checkpoint_path: str | Path) -> Path:
    """Where a Checkpoint call may write: `<stem>_last.pth` (the learner now, what `--resume`
    continues) for an empty name, else a `.pth` file name (letters, digits, `.`, `_`, `-`) beside
    the configured checkpoint, other than the checkpoint itself: that one holds the best evaluated
    policy and its scores, and only a better evaluation replaces it.

    The call comes over the network, so the name is data: no folders (a name with a `/` could reach
    any folder below the checkpoint's, the project's `.venv` among them), no links, and an existing
    file is replaced only if it is a TITAN-RL checkpoint.
    """
    if not requested:
        return last_path(checkpoint_path)
    if not CHECKPOINT_NAME.fullmatch(requested):
        raise TitanError(f"{requested!r} must be a file name ending in .pth, of letters, digits, '.', '_' and '-' (no folders)")
    if requested == Path(checkpoint_path).name:
        raise TitanError(f"{requested!r} is the kept checkpoint (the best evaluated policy): only a better evaluation replaces it")
    target = Path(checkpoint_path).resolve().parent / requested
    try:
        link, exists, is_dir = target.is_symlink(), target.exists(), target.is_dir()
    except OSError as e:  # a file system that takes shorter names
        raise TitanError(f"{requested!r} cannot name a file: {e.strerror or e}") from None
    if link:
        raise TitanError(f"{requested!r} cannot name a file: it is a symbolic link")
    if exists:
        if is_dir:
            raise TitanError(f"{requested!r} is a directory")
        try:
            load_checkpoint(target)
        except NotACheckpointError:
            raise TitanError(f"{requested!r} exists and is not a TITAN-RL checkpoint: refusing to overwrite it") from None
    return target


def last_path(best_path: str | Path) -> Path:
    """Where the last (not necessarily best) policy goes: checkpoint.pth -> checkpoint_last.pth."""
    p = Path(best_path)
    return p.with_name(f"{p.stem}_last{p.suffix}")


class NotACheckpointError(TitanError):
    """The file was read, and it is not a TITAN-RL checkpoint (of this format): damaged, cut short, or something else."""


DAMAGED_BYTES = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError)
"""What torch's weights-only reader raises on bytes that are not a torch file or are cut short."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, never pickled code.

    NotACheckpointError for a file that is not one; TitanError for one that cannot be read (no such
    file, a folder, no permission, an I/O error, no file handles left): only the first may be taken
    for the absence of a checkpoint, since the second may hold one."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise TitanError(f"{path}: no such checkpoint") from e
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: torch's zip reader on a file cut short
            raise TitanError(f"{path}: cannot read a checkpoint there: {e.strerror or e}") from e
        raise NotACheckpointError(f"{path}: not a TITAN-RL checkpoint (a torch file cut short)") from e
    except DAMAGED_BYTES as e:
        # torch's own message suggests weights_only=False, which is exactly what must not happen
        raise NotACheckpointError(f"{path}: not a TITAN-RL checkpoint (not a torch file of tensors and plain values)") from e
    found = payload.get("format") if isinstance(payload, dict) else None
    if found in OLD_FORMATS:
        raise NotACheckpointError(f"{path}: checkpoint format {found!r} is {OLD_FORMATS[found]}")
    if found != FORMAT:
        raise NotACheckpointError(f"{path}: not a TITAN-RL checkpoint (format {found!r}, expected {FORMAT!r})")
    return payload


def policy_from_checkpoint(payload: dict[str, Any], extra_modules: tuple[str, ...] = ()) -> tuple[nn.Module, Config, Algorithm]:
    """Rebuild the algorithm and policy classes named in the stored config and load the weights.

    The config is data: its class paths must name classes under models/ or trainers/ (or the
    packages the user names in `extra_modules`, e.g. visualize.py --allow-module) of the right
    kind (titan_rl.registry), checked before anything is imported or called.
    """
    try:
        config = payload["config"]
        if isinstance(config, dict) and isinstance(config.get("logging"), dict):  # the run's folder plays no part in a policy
            config = {**config, "logging": {**config["logging"], "run_name": ""}}  # (and MinAtar's default names were paths)
        cfg = config_from_dict(config, "checkpoint config", allowed_modules=(*CHECKPOINT_MODULES, *extra_modules))
        algorithm = build_algorithm(cfg)
        policy = build_policy(cfg)
        policy.load_state_dict(payload["policy"])
    except (KeyError, TypeError, RuntimeError) as e:  # entries missing, or weights that do not fit the stored policy class
        raise TitanError(f"the checkpoint does not rebuild its policy: {e}") from e
    return policy.eval(), cfg, algorithm


def run_name_of(payload: dict[str, Any]) -> str:
    """The run that wrote a checkpoint (its config's `logging.run_name`), or ""."""
    config = payload.get("config")
    section = config.get("logging") if isinstance(config, dict) else None
    name = section.get("run_name", "") if isinstance(section, dict) else ""
    return name if isinstance(name, str) else ""


def run_to_resume(checkpoint_path: str | Path) -> str:
    """The run whose `<stem>_last.pth` lies beside `checkpoint_path`: what `--resume` continues."""
    path = last_path(checkpoint_path)
    if not path.exists():
        raise TitanError(f"--resume: no {path} to resume from (the trainer writes it every durability.checkpoint_interval_s)")
    name = run_name_of(load_checkpoint(path))
    if not name:
        raise TitanError(f"--resume: {path} names no run")
    if not RUN_NAME.fullmatch(name):  # a checkpoint is data: its run name must not lead the run's files elsewhere
        raise TitanError(f"--resume: {path} names the run {name!r}, which is not one folder name: refusing to resume it")
    return name
