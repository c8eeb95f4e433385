"""The buffer process: restore its tables, serve them, snapshot them, stop (`python -m titan_rl.buffer`).

Its tables, and the record signature of each, come from the algorithm the config names. With a
snapshot path (`durability.snapshot_path`, or a run name to derive it from) it restores its
tables, and the statistics of what each rollout replica sent, from the last snapshot at start,
saves them every `durability.snapshot_interval_s` and once more on SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import logging
import threading

import grpc

from titan_rl.buffer.service import BufferServicer, tables_for
from titan_rl.buffer.snapshot import Snapshotter, restore
from titan_rl.buffer.table import Table
from titan_rl.config import Config
from titan_rl.errors import TitanError
from titan_rl.registry import build_algorithm
from titan_rl.rpc import make_server, set_serving
from titan_rl.service import hangup_log_path, serve_until_signal
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc

log = logging.getLogger("titan_rl.buffer")

SOURCES_KEY = "sources"  # the replicas' statistics in a snapshot's extra state


def serve(cfg: Config) -> tuple[grpc.Server, int, BufferServicer]:
    """Start a buffer server as configured, its tables restored from the snapshot if there is one;
    returns (server, bound port, servicer)."""
    tables = tables_for(build_algorithm(cfg), cfg.seed)
    servicer = BufferServicer(tables)
    if (path := cfg.snapshot_path()) is not None and (extra := restore(tables, path)) is not None:
        if SOURCES_KEY in extra:  # absent from a snapshot of a buffer that kept no statistics: they start at zero
            try:
                servicer.sources.load_state_dict(extra[SOURCES_KEY])
            except TitanError as e:
                raise TitanError(f"{path}: {e}") from e
        restored = ", ".join(f"{name}: {t.info().size} items, {t.env_steps_total} env steps" for name, t in tables.items())
        log.info("restored %s and %d episodes from %s", restored, servicer.sources.episodes, path)
    server, port, health = make_server(cfg.buffer_server.host, cfg.buffer_server.port)
    buffer_pb2_grpc.add_BufferServiceServicer_to_server(servicer, server)
    server.start()
    set_serving(health, [buffer_pb2.DESCRIPTOR.services_by_name["BufferService"].full_name])
    return server, port, servicer


def start(cfg: Config) -> tuple[grpc.Server, int, dict[str, Table]]:
    """`serve`, returning the tables by name instead of the servicer."""
    server, port, servicer = serve(cfg)
    return server, port, servicer.tables


def watch_peers(servicer: BufferServicer, peer_timeout_s: float, stop: threading.Event, learner_gone: threading.Event) -> None:
    """Set `stop` once the run has ended, or once no learner has had a SampleStream open for
    `peer_timeout_s` (then `learner_gone` too)."""
    while not stop.wait(0.5):
        if servicer.run_ended.is_set():
            stop.set()
        elif (absent_s := servicer.learner_absent_s()) >= peer_timeout_s:
            log.error("no learner has read from this buffer for %.0fs (durability.peer_timeout_s): the trainer is gone", absent_s)
            learner_gone.set()
            stop.set()


def run_service(cfg: Config) -> None:
    """Serve until stopped (a signal, the end of the run, or a peer gone for good); exits non-zero
    where a supervisor should start it again."""
    try:
        server, port, servicer = serve(cfg)
    except TitanError as e:
        raise SystemExit(f"error: {e}") from None
    tables = servicer.tables
    for name, table in tables.items():
        fields = ", ".join(f"{f} {s.dtype.name}{list(s.shape)}" for f, s in table.layout.slots.items())
        log.info("table %r: %s, %d items of {%s}", name, table.spec.kind, table.storage.capacity, fields)
    log.info("buffer serving on %s:%d", cfg.buffer_server.host, port)
    snapshotter = None
    if (path := cfg.snapshot_path()) is not None:

        def statistics() -> dict:
            return {SOURCES_KEY: servicer.sources.state_dict()}

        snapshotter = Snapshotter(tables, path, cfg.durability.snapshot_interval_s, extra=statistics)
        snapshotter.start()
    else:
        log.warning("no snapshots: set logging.run_name or durability.snapshot_path to keep the replay across restarts")

    def close() -> None:
        for table in tables.values():
            table.close()
        if snapshotter is not None and (saved := snapshotter.close()) is not None:
            log.info("snapshot: %.1f MB written to %s", saved.bytes / 1e6, saved.path)

    stop, learner_gone = threading.Event(), threading.Event()
    watcher = threading.Thread(target=watch_peers, args=(servicer, cfg.durability.peer_timeout_s, stop, learner_gone), daemon=True)
    watcher.start()
    serve_until_signal(server, "buffer", on_stop=close, stop_event=stop, hangup_log=hangup_log_path(cfg, "buffer"))
    stop.set()
    if learner_gone.is_set():
        raise SystemExit(1)
