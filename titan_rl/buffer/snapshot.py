"""The buffer's tables on disk: saved periodically and at a clean stop, restored at start.

One file holds every table, written to a temporary name, flushed to disk and renamed, so a
reader (or a buffer restarted after kill -9) sees the previous snapshot or the new one, never
half of one. The file is an uncompressed `.npz` read with `allow_pickle=False`: arrays stay
arrays, and everything else in the tables' state dicts (numbers, strings, lists) travels as
one JSON entry, so loading a snapshot never runs code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from titan_rl.buffer.table import Table
from titan_rl.errors import TitanError

log = logging.getLogger(__name__)

FORMAT = "titan-rl-buffer-snapshot/2"
_META = "meta.json"
WRITE_PIECE_BYTES = 1 << 18
SNAPSHOT_NICE = 19


def _flatten(tree: Mapping[str, Any], prefix: str, arrays: dict[str, np.ndarray], written: frozenset[str]) -> dict[str, Any]:
    """Move every array of `tree` into `arrays` (named by its path) and return the rest, with
    placeholders; arrays at a path in `written` are already in the file and stay out of `arrays`."""
    rest: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}"
        if isinstance(value, np.ndarray):
            if path not in written:
                arrays[path] = value
            rest[key] = {"__array__": path}
        elif isinstance(value, Mapping):
            rest[key] = _flatten(value, path, arrays, written)
        else:
            rest[key] = value
    return rest


def _unflatten(tree: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            return arrays[tree["__array__"]]
        return {key: _unflatten(value, arrays) for key, value in tree.items()}
    return tree


def _write_array(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    """Add `array` as `name`.npy, as `np.savez` would, but without its copy of the array and at
    half speed: WRITE_PIECE_BYTES at a time, each piece followed by a pause as long as it took, so
    that on two cores the buffer's gRPC threads keep a core (benchmarks/snapshot.py). Each piece
    is copied before it is checksummed and written: `array` may be a table's live rows, and the
    file must hold the bytes its CRC was computed over."""
    array = np.ascontiguousarray(array)
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_2_0(member, np.lib.format.header_data_from_array_1_0(array))
        data = memoryview(array.reshape(-1)).cast("B")
        for start in range(0, len(data), WRITE_PIECE_BYTES):
            began = time.perf_counter()
            member.write(bytes(data[start : start + WRITE_PIECE_BYTES]))
            time.sleep(time.perf_counter() - began)


def _finish(archive: zipfile.ZipFile, tables: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any], written: frozenset[str]) -> None:
    """Write the tables' arrays not yet in `archive`, then the rest of their states and `extra` as JSON."""
    arrays: dict[str, np.ndarray] = {}
    states = {name: _flatten(state, name, arrays, written) for name, state in tables.items()}
    meta = {"format": FORMAT, "tables": states, "extra": dict(extra)}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    for name, array in arrays.items():
        _write_array(archive, name, array)


def _write_atomically(path: Path, fill: Callable[[zipfile.ZipFile], None]) -> int:
    """Create `path` as an uncompressed zip that `fill` writes: under a temporary name, synced, then
    renamed over the old file (removed on any failure); returns the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                fill(archive)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut only once the directory is synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path.stat().st_size


def write_snapshot(path: Path, tables: Mapping[str, dict[str, Any]], extra: Mapping[str, Any]) -> int:
    """Write the tables' states and `extra` (plain values) to `path` atomically; returns the bytes written."""
    return _write_atomically(path, lambda archive: _finish(archive, tables, extra, frozenset()))


def read_snapshot(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(table states by name, extra) from a file `write_snapshot` wrote; TitanError for anything else."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(arrays.pop(_META).tobytes())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise TitanError(f"{path}: not a TITAN-RL buffer snapshot: {e}") from e
    found = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(found, str) and found.startswith(FORMAT.rpartition("/")[0] + "/") and found != FORMAT:
        raise TitanError(f"{path}: a buffer snapshot of format {found!r}, this version reads {FORMAT!r}: move it away to start empty")
    if found != FORMAT:
        raise TitanError(f"{path}: not a TITAN-RL buffer snapshot (format {found!r})")
    try:
        return {name: _unflatten(state, arrays) for name, state in meta["tables"].items()}, dict(meta["extra"])
    except (KeyError, TypeError, AttributeError) as e:
        raise TitanError(f"{path}: a damaged buffer snapshot: {e}") from e


def restore(tables: Mapping[str, Table], path: Path) -> dict[str, Any] | None:
    """Load the snapshot at `path` into `tables`; returns its extra state, or None when there is none.

    A snapshot of other tables (another algorithm or capacity) is an error that names the file:
    starting empty would silently throw the replay away."""
    if not path.exists():
        return None
    states, extra = read_snapshot(path)
    if set(states) != set(tables):
        raise TitanError(f"{path} holds tables {sorted(states)}, this buffer serves {sorted(tables)}: move it away to start empty")
    for name, table in tables.items():
        try:
            table.load_state_dict(states[name])
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            raise TitanError(f"{path}: table {name!r} does not fit this buffer's config ({e}); move it away to start empty") from e
    return extra


def yield_the_cores() -> None:
    """Give the calling thread the lowest CPU priority (nice 19; on Linux it applies to this thread
    alone): the buffer's gRPC threads then preempt the snapshot, where on two cores they queued
    behind it for a scheduler slice (benchmarks/snapshot.py)."""
    with contextlib.suppress(AttributeError, OSError):  # no per-thread priority on this platform
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SNAPSHOT_NICE)


@dataclass
class SaveStats:
    path: Path
    bytes: int
    rows_s: float  # writing the tables' rows (samples and inserts go on meanwhile)
    rest_s: float  # the rows changed meanwhile, the samplers' state and the rest; syncing the file


class Snapshotter:
    """Saves every table to `path` every `interval_s` seconds (0: never on its own) from a thread of
    its own, and once more on `close()`. `extra()` adds plain values (e.g. senders' sequence numbers).

    A save streams each table's rows into the file straight from the table (`Table.snapshot`), with
    no copy of the replay in memory and without its lock; the rows inserted meanwhile follow as a
    patch. The file is the tables as they were when the last of them finished."""

    def __init__(self, tables: Mapping[str, Table], path: Path, interval_s: float, extra: Callable[[], Mapping[str, Any]] = dict):
        self.tables, self.path, self.interval_s, self.extra = tables, path, interval_s, extra
        self.saves = 0
        self._lock = threading.Lock()  # one save at a time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshotter", daemon=True)

    def start(self) -> None:
        if self.interval_s > 0:
            self._thread.start()

    def save(self) -> SaveStats:
        with self._lock:
            started = time.perf_counter()
            rows_written = started

            def fill(archive: zipfile.ZipFile) -> None:
                nonlocal rows_written
                states, written = {}, set()
                for name, table in self.tables.items():
                    member = f"{name}/storage/records"  # the path `_flatten` gives the state's records
                    states[name] = table.snapshot(functools.partial(_write_array, archive, member))
                    written.add(member)
                rows_written = time.perf_counter()
                _finish(archive, states, self.extra(), frozenset(written))

            size = _write_atomically(self.path, fill)
            self.saves += 1
            return SaveStats(self.path, size, rows_written - started, time.perf_counter() - rows_written)

    def _run(self) -> None:
        yield_the_cores()
        while not self._stop.wait(self.interval_s):
            try:
                stats = self.save()
                log.info("snapshot: %.1f MB in %.2fs to %s", stats.bytes / 1e6, stats.rows_s + stats.rest_s, stats.path)
            except (OSError, TitanError) as e:
                log.error("snapshot to %s failed: %s; the previous one stays", self.path, e)

    def close(self) -> SaveStats | None:
        """Stop the timer and save once more (a clean stop loses nothing); None if that save failed."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            return self.save()
        except (OSError, TitanError) as e:
            log.error("final snapshot to %s failed: %s", self.path, e)
            return None
