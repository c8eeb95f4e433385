"""Shared fixtures: configs, and real gRPC servers on free 127.0.0.1 ports."""

from __future__ import annotations

import os

import pytest

from tests.helpers import REPO, serving_buffer
from titan_rl.shared_keys import ENV as SHARED_KEYS_ENV

os.environ["WANDB_MODE"] = "disabled"  # inherited by every service a test starts

USER_FILES = ("runs", "wandb", "checkpoint.pth", "checkpoint_last.pth")
"""What a user's own `bash run.sh` leaves in the repository: the suite must neither add to it nor overwrite it."""


def _user_files() -> dict[str, float]:
    found = {}
    for name in USER_FILES:
        path = REPO / name
        for item in [path, *(path.iterdir() if path.is_dir() else ())]:
            if item.exists():
                found[str(item.relative_to(REPO))] = item.stat().st_mtime
    return found


@pytest.fixture(scope="session", autouse=True)
def the_suite_leaves_the_users_runs_alone():
    before = _user_files()
    yield
    after = _user_files()
    changed = sorted(name for name, mtime in after.items() if before.get(name) != mtime and name not in USER_FILES)
    assert not changed, f"the test suite wrote into the repository: {changed}"


@pytest.fixture(autouse=True)
def this_process_is_no_service_of_a_run(monkeypatch):
    """A test that calls a service's entry point here (`parse_service_args`) makes this process a
    service of a run: the clients of every later test would carry its values of the shared keys."""
    monkeypatch.setenv(SHARED_KEYS_ENV, "")  # remembers its absence, restored after the test
    monkeypatch.delenv(SHARED_KEYS_ENV)


@pytest.fixture
def buffer_server():
    """A real buffer service (DQN's uniform table) on a free port, no rate limit worth mentioning; yields (address, table)."""
    with serving_buffer() as served:
        yield served
