"""One private temporary folder per run for the files libraries write on their own, removed when the run ends.

Left to themselves, the libraries write outside the run and leave it there: W&B its media and
artifact folders in $TMPDIR (its clean-up is an atexit hook, which a service forked by the launcher,
leaving through `os._exit`, never runs) and wandb-core's debug logs in ~/.cache/wandb; torch its
compiler's cache folder, $TMPDIR/torchinductor_<user>, when `torch._dynamo` is imported. What a run
keeps (metrics, the W&B run, logs, snapshots) is written to its run folder, not here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

SCRATCH_ENV = "TITAN_RL_SCRATCH"
"""The run's folder, for the processes started inside it: they use it and leave its removal to the process that made it."""


def scratch_env(path: Path) -> dict[str, str]:
    """The variables that send the libraries' files to `path`."""
    return {
        SCRATCH_ENV: str(path),
        "TMPDIR": str(path),  # Python's tempfile in the processes started: W&B's media and artifact folders
        "TORCHINDUCTOR_CACHE_DIR": str(path / "torchinductor"),  # read when torch._dynamo is imported
        "WANDB_CACHE_DIR": str(path / "wandb-cache"),  # wandb-core's debug logs, the artifact cache
        "WANDB_DATA_DIR": str(path / "wandb-data"),  # artifact staging
    }


@contextlib.contextmanager
def run_scratch_dir() -> Iterator[Path]:
    """Give this process and every process it starts afterwards a fresh private temporary folder
    (see the module's docstring), and remove it on leaving. Inside another run's (an environment
    that names one), that one is used and left in place.

    This process's own `tempfile` keeps its folder: multiprocessing's own temporary folders there
    are removed by multiprocessing at exit, after this one. Its W&B and torch files follow the
    environment, and its W&B media folders are removed at its (normal) exit.
    """
    inherited = os.environ.get(SCRATCH_ENV)
    if inherited:
        yield Path(inherited)
        return
    path = Path(tempfile.mkdtemp(prefix="titan-rl-"))  # mode 0700
    saved = {name: os.environ.get(name) for name in scratch_env(path)}
    os.environ.update(scratch_env(path))
    try:
        yield path
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(path, ignore_errors=True)
