"""What every service's `python -m titan_rl.<service>` entry point shares: arguments, logging, serving until a signal."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Callable, Mapping
from multiprocessing import forkserver
from pathlib import Path

import grpc

from titan_rl.auth import TOKEN_ENV, check_token_env, use_token
from titan_rl.config import Config, load_config
from titan_rl.errors import TitanError
from titan_rl.shared_keys import use_shared_keys
from titan_rl.tls import load_tls, use_tls

log = logging.getLogger(__name__)

PARENT_PID_ENV = "TITAN_RL_PARENT_PID"
_PR_SET_PDEATHSIG = 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a service process that must not outlive this one (see `die_with_parent`)."""
    return {**env, PARENT_PID_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """Get SIGTERM when the process named by $TITAN_RL_PARENT_PID (the launcher) dies; exit now if it already has.

    Asked for here, after exec, and not in a `preexec_fn`: a preexec_fn makes subprocess fork() instead
    of vfork(), which runs gRPC's fork handlers, and those hung a parent that had live channels.
    The variable is removed so this process's own children (rollout workers) do not inherit it.
    """
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent is not None:
        die_with(int(parent))


def die_with(parent_pid: int) -> None:
    """Get SIGTERM when `parent_pid`, this process's parent, dies; exit now if it already has (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        sys.exit(f"parent {parent_pid} exited before this service started")


def run_forked_service(service: str, argv: list[str], log_path: str | None, token: str) -> None:
    """Process target: `python -m titan_rl.<service> *argv` in a process forked from the launcher's
    forkserver (see `titan_rl.preload`), which imported torch and every service's modules once for
    all three. Like the process the launcher would otherwise exec: a session of its own (Ctrl-C in
    the terminal reaches only the launcher), output to `log_path` (None: the launcher's), the run's
    token in its environment, and SIGTERM once the launcher is gone.

    That last goes through the forkserver, this process's parent, which exits once no process holds
    the write end of its "alive" pipe: multiprocessing hands that end to every child it forks, so a
    service closes it here, leaving the launcher the only holder.
    """
    launched_by = forkserver._forkserver  # multiprocessing's own record of the pipe end it handed down
    if launched_by._forkserver_alive_fd is not None:
        os.close(launched_by._forkserver_alive_fd)
        launched_by._forkserver_alive_fd = None
    os.setsid()
    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, sys.stdout.fileno())
        os.dup2(fd, sys.stderr.fileno())
        os.close(fd)
    os.environ[TOKEN_ENV] = token
    die_with(os.getppid())
    launcher = mp.parent_process()
    if launcher is not None and not launcher.is_alive():  # before the forkserver could pass its death on
        sys.exit("the launcher exited before this service started")
    importlib.import_module(f"titan_rl.{service}.__main__").main(argv)


def exit_with_parent_process() -> None:
    """In a multiprocessing child (a rollout worker, the evaluator): end this process the moment the
    process that started it is gone, whatever this one's main thread is blocked on.

    A daemon thread waits on multiprocessing's parent sentinel. Polling `os.getppid()` from the
    main thread was not enough: a trainer killed while writing a job left its evaluator blocked
    for good in the middle of a queue read, and a worker forked from a forkserver keeps the
    forkserver, its parent by pid, alive after the service that asked for it has died.
    """
    parent = mp.parent_process()
    if parent is None:
        return

    def exit_once_parent_is_gone() -> None:
        parent.join()
        os._exit(0)

    threading.Thread(target=exit_once_parent_is_gone, name="parent-watch", daemon=True).start()


def keep_freed_memory() -> None:
    """Make glibc keep freed blocks of up to a few MB for reuse instead of handing them back to the kernel.

    By default a block of 128 KB or more is mmap()ed, or trimmed off the heap, when freed, and the
    next one is page-faulted back in: every 4,096-row chunk or sampled batch then paid ~2.5 us per
    4 KB page here (encoding and serialising a 196 KB chunk took ~360 us instead of ~20 us). Costs
    up to 32 MB of freed memory kept resident at the top of each malloc arena (glibc makes up to
    8 per core, and never trims freed blocks below an arena's top anyway). A no-op where glibc's
    `mallopt` is missing.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 4 << 20)
        mallopt(_M_TRIM_THRESHOLD, 32 << 20)


def parse_service_args(service: str, section: str, argv: list[str] | None = None, resumable: bool = False) -> Config:
    """`--config FILE --host H --port P --seed S [section.key=value ...]` -> validated Config.

    --host/--port replace `<section>.host/port`; a user mistake exits with the message, not a traceback.
    Makes the config's token and TLS settings this process's (titan_rl.auth, titan_rl.tls).
    `resumable` adds `--resume`: continue the run of the last checkpoint (its `logging.run_name`).
    """
    parser = argparse.ArgumentParser(prog=f"python -m titan_rl.{service}", description=f"Run the TITAN-RL {service} service.")
    parser.add_argument("--config", default="config/cartpole.yaml", help="YAML config file")
    parser.add_argument("--host", help=f"bind address (default: {section}.host)")
    parser.add_argument("--port", type=int, help=f"port, 0 for any free one (default: {section}.port)")
    parser.add_argument("--seed", type=int, help="overrides seed")
    if resumable:
        parser.add_argument("--resume", action="store_true", help="continue the run of <checkpoint stem>_last.pth")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. algorithm.config.lr=0.0005")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.host is not None:
        overrides.append(f"{section}.host={args.host}")
    if args.port is not None:
        overrides.append(f"{section}.port={args.port}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return load_service_config(args.config, overrides, service, resume=getattr(args, "resume", False))


def load_service_config(config_path: str, overrides: list[str], role: str, resume: bool = False) -> Config:
    """The config of a process of a run, validated, with its token, TLS settings and values of the
    keys `role` shares with the other services (titan_rl.shared_keys) made this process's; a user
    mistake exits with the message, not a traceback. `resume`: continue the run of the last
    checkpoint (its `logging.run_name`)."""
    setup_logging()
    die_with_parent()
    keep_freed_memory()
    try:
        cfg = load_config(config_path, overrides)
        if resume:
            from titan_rl.checkpoint import run_to_resume  # imports torch: only the trainer gets here

            cfg = load_config(config_path, [*overrides, f"logging.run_name={run_to_resume(cfg.logging.checkpoint_path)}"])
        tls = load_tls(cfg.security, config_path)
        check_token_env()
    except TitanError as e:
        sys.exit(f"error: {e}")
    use_token(cfg.security.token)
    use_tls(tls)
    use_shared_keys(cfg, role)
    return cfg


def with_bound_port(cfg: Config, section: str, port: int) -> Config:
    """The config with `<section>.port` set to the port actually bound (when 0 was asked for)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), port=port)})


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")


@dataclasses.dataclass(frozen=True)
class _StopSignals:
    """What the stop-signal watcher calls, for which signals, and the wakeup socket's two ends."""

    stop: Callable[[signal.Signals], object]
    hangup_log: Path | None
    signals: frozenset[int]
    wakeup: tuple[socket.socket, socket.socket]


_stop_signals: _StopSignals | None = None  # one watcher per process; a later `on_stop_signals` replaces what it calls


def on_stop_signals(stop: Callable[[signal.Signals], object], hangup_log: Path | None = None) -> None:
    """Call `stop(signal)` on SIGINT, SIGTERM and SIGHUP: the terminal is gone (an ssh session that
    dropped), so SIGHUP first sends standard output and error that went to it to `hangup_log`
    (appended; /dev/null if None), where writes cannot fail, then stops as SIGTERM does, saving
    what that saves. Where SIGHUP is ignored, as under `nohup`, it stays ignored: the process
    outlives its terminal.

    `stop` runs on a watcher thread, never in a signal handler. A handler runs between two
    bytecodes of the main thread, which may hold the very lock `stop` takes (an Event's, a
    stream's), and a second signal interrupts the first handler: either way the process hung
    for good and ignored SIGTERM from then on. Here the handlers do nothing; the interpreter's C
    handler writes each signal's number to a wakeup socket, which the watcher reads."""
    global _stop_signals
    signals = {signal.SIGINT, signal.SIGTERM}
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.add(signal.SIGHUP)
    if _stop_signals is None:
        read_end, write_end = socket.socketpair()
        write_end.setblocking(False)
        signal.set_wakeup_fd(write_end.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=_watch_stop_signals, args=(read_end,), name="stop-signals", daemon=True).start()
        wakeup = (read_end, write_end)
    else:
        wakeup = _stop_signals.wakeup
    _stop_signals = _StopSignals(stop, hangup_log, frozenset(int(sig) for sig in signals), wakeup)
    for sig in signals:
        signal.signal(sig, _leave_it_to_the_watcher)


def _leave_it_to_the_watcher(*_: object) -> None:
    """The Python-level handler of a stop signal: its number is already on the wakeup socket."""


def _watch_stop_signals(read_end: socket.socket) -> None:
    """Call the registered `stop` for each stop signal, in the order they came."""
    while True:
        for number in read_end.recv(64):
            handled = _stop_signals
            if handled is None or number not in handled.signals:
                continue
            sig = signal.Signals(number)
            if sig == signal.SIGHUP:
                _logging_errors(leave_terminal, handled.hangup_log, what=sig)
            _logging_errors(handled.stop, sig, what=sig)


def _logging_errors(call: Callable[..., object], *args: object, what: signal.Signals) -> None:
    """`call(*args)`, logging what it raises: a stop that failed once (a print to a pipe gone with the
    same Ctrl-C) must neither end the watcher nor keep the next step of the stop from running."""
    try:
        call(*args)
    except Exception:  # noqa: BLE001 - see above
        log.exception("stopping on %s", what.name)


def leave_terminal(log_path: Path | None = None) -> None:
    """Point standard output and error at the end of `log_path` (made with its folder; /dev/null if
    None, or if it cannot be opened) unless they are files. A terminal that has hung up fails every write (EIO) and no
    longer counts as one for `isatty`; a pipe to it (`| tee`) lost its reader to the same SIGHUP."""
    try:
        if log_path:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        target = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log_path else os.open(os.devnull, os.O_WRONLY)
    except OSError:
        target = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            # a stream closed or None, or a flush interrupted by this very signal (RuntimeError: reentrant call): the stop goes on
            with contextlib.suppress(OSError, ValueError, AttributeError, RuntimeError):
                if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                    os.dup2(target, stream.fileno())
                stream.flush()  # what was left buffered for the terminal goes there too
    finally:
        os.close(target)


def leave_stop_signals_to_parent() -> None:
    """In a process its parent stops (a rollout worker, the evaluator, a learner rank): Ctrl-C and a
    closed terminal signal the whole foreground process group, and the parent stops this one in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if signal.getsignal(signal.SIGTERM) is _leave_it_to_the_watcher:  # forked after `on_stop_signals`: no watcher here
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)  # a fork shares the parent's wakeup socket, whose watcher would stop the parent


def wait_for_signal(extra_stop: threading.Event | None = None, hangup_log: Path | None = None) -> None:
    """Block until SIGINT, SIGTERM or SIGHUP arrives (see `on_stop_signals`) or `extra_stop` is set."""
    signalled = threading.Event()
    on_stop_signals(lambda _: signalled.set(), hangup_log)
    while not signalled.wait(0.2):
        if extra_stop is not None and extra_stop.is_set():
            return


def serve_until_signal(
    server: grpc.Server,
    name: str,
    on_stop: Callable[[], None] = lambda: None,
    stop_event: threading.Event | None = None,
    hangup_log: Path | None = None,
) -> None:
    """Serve until SIGINT, SIGTERM, SIGHUP or `stop_event`, then `on_stop()` and stop the server;
    after a SIGHUP, what it prints goes to `hangup_log` (see `on_stop_signals`)."""
    wait_for_signal(stop_event, hangup_log)
    log.info("%s: stopping", name)
    on_stop()
    server.stop(grace=1.0).wait()
    log.info("%s: stopped", name)


def hangup_log_path(cfg: Config, service: str) -> Path | None:
    """Where a service started by hand writes after its terminal has gone: `<service>.log` in the run
    folder (as under `bash run.sh`), None (/dev/null) without a run name to find it by."""
    return Path(cfg.logging.run_dir) / cfg.logging.run_name / f"{service}.log" if cfg.logging.run_name else None
