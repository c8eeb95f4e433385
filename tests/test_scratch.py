"""A run's scratch folder (`titan_rl.scratch`): private, removed at the end, and, when a run could
not remove it (killed outright, or a process of it still importing torch at the end), removed by the next."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from titan_rl.scratch import SCRATCH_ENV, run_scratch_dir


@pytest.fixture
def temp_root(tmp_path, monkeypatch) -> Path:
    """A $TMPDIR of its own, so the test sees only its folders."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in (SCRATCH_ENV, "TMPDIR", "TORCHINDUCTOR_CACHE_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_the_folder_is_private_named_in_the_environment_and_removed_with_it(temp_root):
    with run_scratch_dir() as path:
        assert path.parent == temp_root and (path.stat().st_mode & 0o777) == 0o700
        assert os.environ["TMPDIR"] == os.environ[SCRATCH_ENV] == str(path)
        assert os.environ["WANDB_CACHE_DIR"].startswith(str(path)) and os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(path))
        (path / "left-by-a-library").write_text("x")
        with run_scratch_dir() as inner:
            assert inner == path, "a process inside the run uses the run's folder"
        assert path.exists(), "and leaves its removal to the process that made it"
    assert not path.exists() and "TMPDIR" not in os.environ and SCRATCH_ENV not in os.environ


def test_the_folders_of_runs_whose_maker_is_gone_are_removed_by_the_next_run(temp_root):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = temp_root / f"titan-rl-{gone.stdout.strip()}-abcd1234"
    (stale / "torchinductor").mkdir(parents=True)
    live = temp_root / f"titan-rl-{os.getpid()}-efgh5678"
    live.mkdir()
    other = temp_root / "titan-rl-not-a-run"
    other.mkdir()
    with run_scratch_dir():
        assert not stale.exists(), "the folder of a run killed outright"
        assert live.exists() and other.exists(), "a running run's folder, and folders not named by a maker, are left alone"


def test_a_scratch_folder_named_in_the_environment_is_used_only_if_it_is_private_and_tmpdir(temp_root, monkeypatch):
    shared = temp_root / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    monkeypatch.setenv(SCRATCH_ENV, str(shared))
    monkeypatch.setenv("TMPDIR", str(shared))
    with run_scratch_dir() as path:
        assert path != shared and os.environ["TMPDIR"] == str(path)
    assert shared.exists()
