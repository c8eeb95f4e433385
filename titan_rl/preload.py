"""The launcher's forkserver: a process that imports torch and every service's modules once, from
which the services are forked instead of being exec'd as `python -m titan_rl.<service>` and each
importing torch again (2-3 CPU-seconds each on two cores, most of the time to the first update).

Only the standard library is imported here, so `titan_rl.launch` starts the forkserver before its
own imports of grpc, yaml and the config code (~0.3 s on the path to the first update).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
from multiprocessing import forkserver

SERVICES = (("buffer", "buffer_server"), ("trainer", "trainer_server"), ("rollout", "rollout_server"))
"""Each service the launcher forks, and its config section."""
# what the services import, torch's compiler included (the trainer's first optimizer imports it),
# after the module that takes the forkserver out of the launcher's process group
PRELOADED_MODULES = [
    "titan_rl.forkserver_group",
    *(f"titan_rl.{service}.{module}" for service, _ in SERVICES for module in ("__main__", "process")),
    "titan_rl.rollout.worker",
    "torch._dynamo",
]


def service_context() -> mp.context.ForkServerContext:
    """The multiprocessing context the services are forked in; its forkserver preloads their modules."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOADED_MODULES)
    return ctx


def start_preloading() -> None:
    """Start the services' forkserver now: its imports run on the other core while the launcher
    reads and checks the config. Their output is unbuffered, as an exec'd service's was."""
    os.environ["PYTHONUNBUFFERED"] = "1"
    service_context()
    forkserver.ensure_running()


def stop_preloading() -> None:
    """End the forkserver before any service was forked from it (the config failed its checks):
    on its own it would notice the launcher is gone only once its imports are done, holding the
    launcher's stdout and stderr open until then."""
    pid = forkserver._forkserver._forkserver_pid  # multiprocessing keeps no public handle on it
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
