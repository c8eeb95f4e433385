"""Buffer snapshots: a table's state on disk and back, taken while inserts and samples go on."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from tests.helpers import transitions
from tests.test_table import SPEC
from titan_rl.algorithm import TableSpec
from titan_rl.buffer.snapshot import Snapshotter, read_snapshot, restore, write_snapshot
from titan_rl.buffer.table import Table
from titan_rl.errors import TitanError


def _table(kind: str = "uniform", capacity: int = 1000, seed: int = 0) -> Table:
    return Table(TableSpec(kind, capacity_items=capacity, slack_items=10**9), SPEC, seed=seed)


def _contents(table: Table) -> np.ndarray:
    return table.storage.gather(np.arange(table.storage.size))


@pytest.mark.parametrize("kind", ["uniform", "prioritized", "fifo"])
def test_a_snapshot_round_trips_every_table_kind_through_a_file(tmp_path, kind):
    saved = _table(kind, capacity=50, seed=1)
    saved.insert_fields(transitions(40), env_steps=80)
    saved.sample(10)
    saved.insert_fields(transitions(15, start=40), env_steps=30)  # wraps the ring (a queue never overwrites unread items)
    if kind == "prioritized":
        saved.update_priorities(np.arange(5, 55), np.linspace(0.1, 5.0, 50))
    saved.sample(10)
    path = tmp_path / "snap.npz"
    Snapshotter({"t": saved}, path, interval_s=0).save()

    loaded = _table(kind, capacity=50, seed=2)
    assert restore({"t": loaded}, path) == {}
    assert loaded.info() == saved.info()
    np.testing.assert_array_equal(_contents(loaded), _contents(saved))
    a, b = loaded.sample(10), saved.sample(10)  # the same random state and priorities: the same draws
    np.testing.assert_array_equal(a.records, b.records)
    assert list(tmp_path.iterdir()) == [path], "no temporary file stays behind"


def _snapshot_as_written(table: Table, during_write: Callable[[], None] = lambda: None) -> dict:
    """`table.snapshot()` with the rows as a file would hold them (a copy taken as they are handed over)."""
    written = []

    def write(rows: np.ndarray) -> None:
        written.append(rows.copy())
        during_write()

    state = table.snapshot(write)
    state["storage"]["records"] = written[0]
    return state


def _loaded(state: dict, capacity: int) -> Table:
    table = _table(capacity=capacity)
    table.load_state_dict(state)
    return table


def test_a_snapshot_taken_during_inserts_is_the_table_at_one_moment(tmp_path):
    """Rows are written, without the lock, while a writer keeps inserting; the rows it wrote meanwhile follow as a patch."""
    table = _table(capacity=4000)
    table.insert_fields(transitions(4000))
    stop = threading.Event()

    def write() -> None:
        start = 4000
        while not stop.is_set():
            table.insert_fields(transitions(37, start=start))
            start += 37

    writer = threading.Thread(target=write)
    writer.start()
    try:
        states = [_snapshot_as_written(table, lambda: time.sleep(0.01)) for _ in range(5)]
    finally:
        stop.set()
        writer.join()
    for state in states:
        loaded = _loaded(state, 4000)
        obs0 = table.layout.views(_contents(loaded))["obs"][:, 0].astype(int)
        # item k sits at slot k % capacity: the rows hold exactly the newest 4,000 items as of the insert count saved
        newest = state["storage"]["inserts_total"] - 1
        expected = newest - (newest - np.arange(4000)) % 4000
        np.testing.assert_array_equal(obs0, expected)
    assert all(len(state["storage"]["patch_slots"]) for state in states), "the writer ran during every snapshot"


def test_loading_a_snapshot_of_other_tables_names_the_file_and_changes_nothing(tmp_path):
    path = tmp_path / "snap.npz"
    saved = _table(capacity=50)
    saved.insert_fields(transitions(20))
    write_snapshot(path, {"t": saved.state_dict()}, {})
    for tables in ({"other": _table(capacity=50)}, {"t": _table(capacity=60)}):
        with pytest.raises(TitanError, match="snap.npz"):
            restore(tables, path)
        assert all(t.info().inserts_total == 0 for t in tables.values())


def test_a_file_that_is_not_a_snapshot_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "snap.npz"
    np.save(tmp_path / "x.npy", np.array([object()], dtype=object), allow_pickle=True)
    np.savez(path, **{"meta.json": np.load(tmp_path / "x.npy", allow_pickle=True)})
    with pytest.raises(TitanError, match="not a TITAN-RL buffer snapshot"):
        read_snapshot(path)
    path.write_bytes(b"garbage")
    with pytest.raises(TitanError, match="not a TITAN-RL buffer snapshot"):
        read_snapshot(path)


def test_no_snapshot_file_means_an_empty_start(tmp_path):
    assert restore({"t": _table()}, tmp_path / "missing.npz") is None


def test_rows_overwritten_while_they_are_written_are_patched():
    """Deterministic: inserts land while the rows are written, over rows already written and past the filled ones."""
    table = _table(capacity=100)
    table.insert_fields(transitions(90))
    state = _snapshot_as_written(table, lambda: table.insert_fields(transitions(20, start=90)))  # items 90-109: slots 90-99, 0-9
    assert state["storage"]["inserts_total"] == 110 and len(state["storage"]["records"]) == 90
    loaded = _loaded(state, 100)
    assert table.layout.views(_contents(loaded))["obs"][:, 0].astype(int).tolist() == list(range(100, 110)) + list(range(10, 100))


def test_a_state_whose_patch_misses_rows_is_refused_and_changes_nothing():
    table = _table(capacity=100)
    table.insert_fields(transitions(90))
    state = _snapshot_as_written(table, lambda: table.insert_fields(transitions(5, start=90)))
    storage = state["storage"]
    storage["patch_slots"], storage["patch_records"] = storage["patch_slots"][:-1], storage["patch_records"][:-1]
    fresh = _table(capacity=100)
    with pytest.raises(ValueError, match="neither saved nor patched"):
        fresh.load_state_dict(state)
    assert fresh.info().inserts_total == 0


def test_a_snapshot_of_an_older_format_is_named_as_such_with_what_to_do(tmp_path):
    path = tmp_path / "snap.npz"
    meta = json.dumps({"format": "titan-rl-buffer-snapshot/1", "tables": {}, "extra": {}}).encode()
    np.savez(path, **{"meta.json": np.frombuffer(meta, np.uint8)})
    with pytest.raises(TitanError, match=r"snap.npz: a buffer snapshot of format 'titan-rl-buffer-snapshot/1'.*move it away"):
        read_snapshot(path)
