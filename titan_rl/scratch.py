"""One private temporary folder per run for the files libraries write on their own, removed when the run ends.

Left to themselves, the libraries write outside the run and leave it there: W&B its media and
artifact folders in $TMPDIR (its clean-up is an atexit hook, which a service forked by the launcher,
leaving through `os._exit`, never runs) and wandb-core's debug logs in ~/.cache/wandb; torch its
compiler's cache folder, $TMPDIR/torchinductor_<user>, when `torch._dynamo` is imported. What a run
keeps (metrics, the W&B run, logs, snapshots) is written to its run folder, not here.

A run killed outright (SIGKILL, out of memory) cannot remove its folder, and a process of a run
that is still importing torch when the run ends may make it again; the folder's name holds the pid
of the process that made it, and the next run removes every such folder whose maker is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

SCRATCH_ENV = "TITAN_RL_SCRATCH"
"""The run's folder, for the processes started inside it: they use it and leave its removal to the process that made it."""
PREFIX = "titan-rl-"
MADE_BY = re.compile(rf"{PREFIX}(\d+)-")
"""The pid of the process that made a scratch folder, in its name."""


def scratch_env(path: Path) -> dict[str, str]:
    """The variables that send the libraries' files to `path`."""
    return {
        SCRATCH_ENV: str(path),
        "TMPDIR": str(path),  # Python's tempfile in the processes started: W&B's media and artifact folders
        "TORCHINDUCTOR_CACHE_DIR": str(path / "torchinductor"),  # read when torch._dynamo is imported
        "WANDB_CACHE_DIR": str(path / "wandb-cache"),  # wandb-core's debug logs, the artifact cache
        "WANDB_DATA_DIR": str(path / "wandb-data"),  # artifact staging
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_private_folder(path: Path) -> bool:
    """A real folder (not a link) of this user that only this user can enter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700


def remove_stale_scratch_dirs(parent: Path) -> list[Path]:
    """Remove this user's scratch folders under `parent` whose maker has exited; returns them."""
    removed = []
    for entry in parent.glob(f"{PREFIX}*"):
        made_by = MADE_BY.match(entry.name)
        try:
            st = os.lstat(entry)
        except OSError:
            continue
        if made_by and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not _alive(int(made_by.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def run_scratch_dir() -> Iterator[Path]:
    """Give this process and every process it starts afterwards a fresh private temporary folder
    (see the module's docstring), and remove it on leaving. Inside another run's (the environment
    names one, and it is a private folder of this user that $TMPDIR names too), that one is used
    and left in place.

    This process's own `tempfile` keeps its folder: multiprocessing's own temporary folders there
    are removed by multiprocessing at exit, after this one. Its W&B and torch files follow the
    environment, and its W&B media folders are removed at its (normal) exit.
    """
    inherited = os.environ.get(SCRATCH_ENV)
    if inherited and os.environ.get("TMPDIR") == inherited and _is_private_folder(Path(inherited)):
        yield Path(inherited)
        return
    parent = Path(tempfile.gettempdir())
    remove_stale_scratch_dirs(parent)
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))  # mode 0700
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
