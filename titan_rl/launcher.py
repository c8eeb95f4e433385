"""Start buffer, trainer and rollout as three processes on this machine, train, and stop all three.

Ports left at 0 in the config are picked free here and handed to every service, so all three
agree. Ctrl-C, SIGTERM or a closed terminal asks the trainer to finish (it writes its checkpoint), then stops the
others; children also die with this process (see `titan_rl.service.run_forked_service`), so none
is left behind. The services are forked from the forkserver `titan_rl.launch` started first.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from titan_rl.auth import check_token_env, current_token
from titan_rl.config import Config, default_run_name, load_config, resolve_config_path
from titan_rl.errors import ConfigError, TitanError
from titan_rl.preload import SERVICES, service_context
from titan_rl.rpc import is_serving
from titan_rl.service import on_stop_signals, run_forked_service
from titan_rl.tls import load_tls, use_tls

HEALTH_TIMEOUT_S = 120.0
TRAINER_GRACE_S = 60.0
OTHERS_GRACE_S = 10.0


def signal_process(proc: BaseProcess, sig: signal.Signals) -> None:
    """Send `sig` to `proc` unless it has exited (the forkserver, its parent, reaps it at once)."""
    if proc.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def free_ports(hosts: list[str]) -> list[int]:
    """A free port on each host, all different: every probe socket stays bound until all are
    picked, since the kernel may hand a just-closed port out again."""
    with contextlib.ExitStack() as probes:
        ports = []
        for host in hosts:
            probe = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind((host, 0))
            ports.append(probe.getsockname()[1])
        return ports


def free_port(host: str) -> int:
    return free_ports([host])[0]


def service_ports(cfg: Config, where: str) -> dict[str, int]:
    """Each service section's port: its own, checked free, or a free one picked here for a 0; all
    different. Each is held listening until all are checked, so two sections cannot share one;
    a host this machine cannot bind, or a port in use, is a ConfigError naming the section."""
    with contextlib.ExitStack() as probes:
        ports = {}
        for _, section in SERVICES:
            server = getattr(cfg, section)
            if ":" in server.host and not server.host.startswith("["):
                key = f"{section}.host={server.host!r}"
                raise ConfigError(f"{where}: {key}: write an IPv6 address in brackets, as gRPC reads it: [{server.host}]")
            try:
                host = server.host.removeprefix("[").removesuffix("]")
                family, kind, _, _, address = socket.getaddrinfo(host, server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
                probe = probes.enter_context(socket.socket(family, kind))
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a port in TIME_WAIT is free
                probe.bind(address)
                probe.listen()
            except OSError as e:
                taken = [other for other, port in ports.items() if port == server.port]
                why = f"the port of {taken[0]} too" if taken else (e.strerror or str(e))
                raise ConfigError(f"{where}: cannot listen on {section}.host={server.host!r} {section}.port={server.port}: {why}") from e
            ports[section] = probe.getsockname()[1]
        return ports


def check_can_write(folder: Path, key: str) -> None:
    """ConfigError unless `folder` is a writable folder or can be made one: its nearest existing
    parent is a writable folder. Nothing is left behind."""
    existing = folder
    try:
        while not existing.exists():
            existing = existing.parent
        is_folder = existing.is_dir()
    except OSError as e:  # a parent this user may not search
        raise ConfigError(f"{key}: cannot look into {existing}: {e.strerror or e}") from e
    if not is_folder:
        raise ConfigError(f"{key}: {existing} is not a folder")
    try:  # os.access says yes to root anywhere, /proc included: only writing tells
        with tempfile.TemporaryFile(dir=existing):  # nameless (O_TMPFILE) where the file system can, else removed at once
            pass
    except OSError as e:
        raise ConfigError(f"{key}: {existing} is not writable ({e.strerror or e})") from e


def preflight(cfg: Config, config_path: str, resume: bool = False) -> None:
    """Build what the services will build from `cfg` (the env's spaces, the algorithm, the policy and
    one forward pass of it, its first records (`titan_rl.dry_run`), the learner's device), and
    check where the run writes and that its table fits in memory, so that a mistake stops the
    launch before any process or run folder exists, with the file and the key named. With
    `resume`, also that the checkpoint continued is a run of this config
    (`titan_rl.trainer.resume.check_resumable`)."""
    from titan_rl.buffer.service import check_table_fits  # imports torch: only once the YAML is valid
    from titan_rl.dry_run import dry_run
    from titan_rl.registry import build_algorithm, build_policy
    from titan_rl.trainer.device import resolve_device
    from titan_rl.trainer.resume import check_resumable

    log = cfg.logging
    try:
        check_can_write(Path(log.run_dir) / log.run_name, f"logging.run_dir={log.run_dir!r}")
        check_can_write(Path(log.checkpoint_path).parent, f"logging.checkpoint_path={log.checkpoint_path!r}")
        if Path(log.checkpoint_path).is_dir():
            raise ConfigError(f"logging.checkpoint_path={log.checkpoint_path!r} is a folder, not a file")
        if cfg.durability.snapshot_path:
            check_can_write(Path(cfg.durability.snapshot_path).parent, f"durability.snapshot_path={cfg.durability.snapshot_path!r}")
        algorithm = build_algorithm(cfg)
        policy = build_policy(cfg)
        algorithm.check_network(policy)
        dry_run(cfg, algorithm, policy)
        if resume:
            check_resumable(cfg, algorithm.make_learner(policy))
        check_table_fits(algorithm)
        resolve_device(cfg.train.device)  # the trainer runs on this host too
    except TitanError as e:
        raise TitanError(f"{config_path}: {e}") from e


class Launcher:
    def __init__(self, config_path: str, overrides: list[str], resume: bool = False):
        self.config_path = str(resolve_config_path(config_path))  # the services may start in another directory
        cfg = load_config(self.config_path, overrides)
        check_token_env()
        ports = service_ports(cfg, self.config_path)
        extra = [f"{section}.port={port}" for section, port in ports.items() if getattr(cfg, section).port == 0]
        if resume:  # the same run name: the trainer resumes its last checkpoint, the buffer restores its snapshot
            from titan_rl.checkpoint import run_to_resume

            extra.append(f"logging.run_name={run_to_resume(cfg.logging.checkpoint_path)}")
        elif not cfg.logging.run_name:
            extra.append(f"logging.run_name={default_run_name(cfg)}")
        self.overrides = overrides + extra
        self.cfg: Config = load_config(config_path, self.overrides)
        self.run_dir = Path(self.cfg.logging.run_dir) / self.cfg.logging.run_name
        preflight(self.cfg, self.config_path, resume)
        use_tls(load_tls(self.cfg.security, config_path))  # the health checks speak what the services serve
        # the services answer only calls with this run's token (titan_rl.auth): a fresh one unless one is set
        self.token = current_token() or self.cfg.security.token or secrets.token_urlsafe(32)
        self.procs: dict[str, BaseProcess] = {}
        self._procs_lock = threading.Lock()
        self._stopping = False

    def _start(self, service: str) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # preflight found it writable: changed since, or a file system that lies
            raise TitanError(f"cannot create the run folder {self.run_dir}: {e.strerror or e}") from e
        argv = ["--config", self.config_path, *self.overrides]
        # the trainer's progress is what the user watches
        log_path = None if service == "trainer" else str((self.run_dir / f"{service}.log").resolve())
        proc = service_context().Process(target=run_forked_service, args=(service, argv, log_path, self.token), name=service)
        with self._procs_lock:  # start() polls the services already started (multiprocessing's clean-up)
            try:
                proc.start()
            except (EOFError, OSError) as e:  # the forkserver failed (an import it preloads raised) or was killed
                raise TitanError(f"could not start the {service} service: the launcher's forkserver is gone ({e!r})") from e
            self.procs[service] = proc

    def _log_tail(self, service: str, lines: int = 15) -> str:
        path = self.run_dir / f"{service}.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        pending = {service: getattr(self.cfg, section).dial_address for service, section in SERVICES}
        while pending and not self._stopping:
            for service, address in list(pending.items()):
                code = self._exitcode(service)
                if code is not None:
                    raise TitanError(f"{service} exited with code {code} during start-up\n{self._log_tail(service)}")
                if is_serving(address, timeout_s=0.5):
                    del pending[service]
            if time.monotonic() > deadline:
                raise TitanError(f"no health from {', '.join(pending)} after {HEALTH_TIMEOUT_S:.0f}s")
            if pending:
                time.sleep(0.1)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Ask the trainer to finish (it saves its checkpoint); the rest is stopped once it exits.
        Before the trainer has started, no more services are started. A SIGHUP (the terminal is
        gone) is passed on as it is: the trainer writes to the same terminal (`on_stop_signals`)."""
        if self._stopping:
            if sig == signal.SIGHUP and "trainer" in self.procs:  # the terminal went while the trainer was stopping
                self._signal("trainer", signal.SIGHUP)
            return
        self._stopping = True
        if "trainer" in self.procs:
            self._signal("trainer", signal.SIGHUP if sig == signal.SIGHUP else signal.SIGTERM)
            with contextlib.suppress(OSError):  # a pipe (`| tee`) that the same Ctrl-C ended
                print("\nstopping: the trainer writes its checkpoint, the buffer its snapshot (bash run.sh --resume continues)", flush=True)

    def _exitcode(self, service: str) -> int | None:
        """`service`'s exit code, None while it runs. Read under a lock: `stop` runs on the signal
        watcher's thread, and two threads polling one process at once can read its end twice."""
        with self._procs_lock:
            return self.procs[service].exitcode

    def _signal(self, service: str, sig: signal.Signals) -> None:
        with self._procs_lock:
            signal_process(self.procs[service], sig)

    def _terminate(self, service: str, grace_s: float) -> None:
        if service not in self.procs or self._exitcode(service) is not None:
            return
        self._signal(service, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self._exitcode(service) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._exitcode(service) is None:
            print(f"{service} did not stop within {grace_s:.0f}s; killing it", flush=True)
            with self._procs_lock:
                self.procs[service].kill()
                self.procs[service].join()

    def run(self) -> int:
        started, earlier_summary = time.monotonic(), file_version(self.run_dir / "summary.json")
        died = None  # the service whose death stopped the run
        on_stop_signals(self.stop, hangup_log=self.run_dir / "launcher.log")
        try:
            for service, _ in SERVICES:
                if self._stopping:
                    raise TitanError("stopped by a signal before every service had started")
                self._start(service)
            self._wait_healthy()
            if not self._stopping:
                print(f"services up in {time.monotonic() - started:.1f}s; logs in {self.run_dir}", flush=True)
            while (code := self._exitcode("trainer")) is None:
                for service in ("buffer", "rollout"):
                    # exit 0: the trainer ended the run and told it so (the trainer exits next)
                    if (died_with := self._exitcode(service)) not in (None, 0) and not self._stopping:
                        print(f"{service} died (code {died_with}):\n{self._log_tail(service)}", flush=True)
                        died = service
                        self.stop()
                time.sleep(0.2)
        except TitanError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            code = 1
        finally:
            self._terminate("trainer", TRAINER_GRACE_S)
            for service in ("rollout", "buffer"):
                self._terminate(service, OTHERS_GRACE_S)
        print(summary_text(self.run_dir, earlier_summary, time.monotonic() - started), flush=True)
        if died is not None and code == 0:
            print(f"error: the run stopped because {died} died (its log: {self.run_dir / f'{died}.log'})", file=sys.stderr, flush=True)
            return 1
        return code


def file_version(path: Path) -> tuple[int, int] | None:
    """(inode, modification time in ns) of `path`, None if it does not exist: which write of it is there."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def summary_text(run_dir: Path, earlier: tuple[int, int] | None, wall_s: float) -> str:
    """What the run's `summary.json` says, unless it is still the one that was there at launch
    (`earlier`, its `file_version` then): a resumed run's folder holds the summary of its earlier
    part, which must not be shown as this launch's when the trainer ended without writing one.
    Compared by version, not against the clock, which a network file system's server may set."""
    path = run_dir / "summary.json"
    version = file_version(path)
    if version is None or version == earlier:
        return f"no summary: training did not finish (logs in {run_dir})"
    try:
        s = json.loads(path.read_text())
        best = "-" if s["best_eval_return"] is None else f"{s['best_eval_return']:.1f}"
        return (
            f"done: {s['stop_reason']}\n"
            f"  env steps {s['env_steps']:,}  updates {s['updates']:,}  wall {wall_s:.1f}s (launch to exit)\n"
            f"  best eval return {best}  checkpoint {s['checkpoint']}  (last: {s['last_checkpoint']})"
        )
    except (OSError, ValueError, KeyError, TypeError) as e:  # cut short by a trainer killed while writing it, or edited
        return f"no summary: {path} cannot be read ({type(e).__name__}: {e}; logs in {run_dir})"
