"""How much memory this process may take: the machine's, or less where its cgroup caps it (a
Kubernetes pod's `resources.limits.memory`, a `docker run --memory`). A table larger than that is
refused at start instead of being killed by the kernel once it fills."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
LIMIT_FILES = {"": "memory.max", "memory": "memory.limit_in_bytes"}
"""The limit's file by hierarchy: cgroup v2 (the unified one, named "" in /proc/self/cgroup) and v1's memory controller."""


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cgroup_memory_limits_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> list[int]:
    """The memory limits of this process's cgroup and of each cgroup above it ("max", v2's no
    limit, is none); none where cgroups are not mounted or readable."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    limits = []
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        hierarchy = "" if controllers == "" else ("memory" if "memory" in controllers.split(",") else None)
        if hierarchy is None:
            continue
        base = root / hierarchy if hierarchy else root
        folder = base / relative.lstrip("/")
        while True:  # in a container's cgroup namespace the relative path is "/": the container's own limit is at the base
            try:
                text = (folder / LIMIT_FILES[hierarchy]).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                limits.append(int(text))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return limits


def memory_limit_bytes() -> int:
    """The least of physical memory and every cgroup limit over this process."""
    return min([physical_memory_bytes(), *cgroup_memory_limits_bytes()])
