"""Local learner ranks are reachable from this host only. gloo listens on the address the host's
name resolves to: loopback on a machine whose /etc/hosts maps its name to 127.0.0.1 (as here), the
network on most others. So the test makes such a host: a network namespace with an address of its
own, a UTS namespace whose host name `ip netns exec`'s per-namespace /etc/hosts maps to it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.e2e

ADDRESS = "10.231.251.1"
HOSTNAME = "titan-lan-host"

PROBE = """
import json, multiprocessing as mp, os, subprocess, sys
from titan_rl.trainer.distributed import LearnerGroup, group_store

def listening():
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={os.getpid()}," in line]

def rank_1(address, loopback, found):
    group = LearnerGroup(1, 2, group_store(address, 1, 2, timeout_s=60), timeout_s=60, loopback=loopback)
    group.agree(True)
    found.put(listening())
    group.close()

if __name__ == "__main__":
    loopback = sys.argv[1] == "loopback"
    store = group_store("127.0.0.1:0", 0, 2, timeout_s=60)
    ctx = mp.get_context("spawn")
    found = ctx.Queue()
    other = ctx.Process(target=rank_1, args=(f"127.0.0.1:{store.port}", loopback, found))
    other.start()
    group = LearnerGroup(0, 2, store, timeout_s=60, loopback=loopback)
    group.agree(True)
    mine, theirs = listening(), found.get(timeout=60)
    group.close()
    other.join(60)
    print(json.dumps(mine + theirs))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def lan_host():
    """`ip netns exec` + `unshare --uts` words that run a command on a host named HOSTNAME at ADDRESS."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare") or not shutil.which("ss"):
        pytest.skip("needs root, iproute2 (ip, ss) and util-linux (unshare)")
    ns = f"titan-lan-{os.getpid()}"
    hosts = Path("/etc/netns") / ns
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make a network namespace: {e.stderr.strip()}")
    try:
        _ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _ip("-n", ns, "addr", "add", f"{ADDRESS}/24", "dev", "v0")
        for link in ("v0", "v1", "lo"):
            _ip("-n", ns, "link", "set", link, "up")
        hosts.mkdir(parents=True)
        (hosts / "hosts").write_text(f"127.0.0.1 localhost\n{ADDRESS} {HOSTNAME}\n")  # bound over /etc/hosts by ip netns exec
        yield ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", f'hostname {HOSTNAME} && exec "$@"', "sh"]
    finally:
        shutil.rmtree(hosts, ignore_errors=True)
        subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)


def _listening(lan_host: list[str], tmp_path: Path, mode: str) -> list[str]:
    """Where both ranks of a local group listen, with gloo left to its default or on `loopback`."""
    (probe := tmp_path / "probe.py").write_text(PROBE)  # a file: spawn re-imports its __main__
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([*lan_host, sys.executable, str(probe), mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_local_learner_ranks_listen_on_loopback_only_on_a_host_whose_name_is_on_the_network(lan_host, tmp_path):
    exposed = _listening(lan_host, tmp_path, "default")
    assert any(address.startswith(f"{ADDRESS}:") for address in exposed), f"the host does not show gloo's default: {exposed}"
    local = _listening(lan_host, tmp_path, "loopback")
    assert local and all(address.startswith("127.0.0.1:") for address in local), local
