"""Where the learner computes: `train.device` (cpu, cuda, auto) resolved to a torch device.

Everything else stays on the CPU whatever the device: actors and the evaluator act with CPU copies
of the weights, and checkpoints and published weights hold CPU tensors, so a run trained on a GPU
is watched, evaluated and resumed anywhere.
"""

from __future__ import annotations

import torch

from titan_rl.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device of `train.device` for learner `local_rank` of those on its host: they take
    one GPU each (NCCL refuses two ranks on one). `auto`: a GPU where torch sees one, else the CPU.
    The config has checked that `name` is one of cpu, cuda and auto."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"train.device=cuda, but torch {torch.__version__} ({build}) sees no GPU on this host; use cpu or auto")
    if local_rank >= (gpus := torch.cuda.device_count()):
        raise ConfigError(f"train.device={name}: learner {local_rank + 1} on this host needs GPU {local_rank}, and this host has {gpus}")
    return torch.device("cuda", local_rank)


def use_device(device: torch.device) -> None:
    """Make a GPU this process's current device before anything is built on it: NCCL's communicator
    and CUDA's default allocations then land there, not on GPU 0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def distributed_backend(device: torch.device) -> str:
    """The torch.distributed backend for learners on `device`: NCCL between GPUs, gloo between CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"
