"""YAML -> frozen, validated dataclasses.

Every section is a dataclass; a field's `metadata` may carry `range=(lo, hi)` (inclusive, finite),
`choices=(...)` or `excludes="..."` (characters a string may not hold). Loading rejects unknown
keys (suggesting the closest name), wrong types and out-of-range values with messages that name
the file and the dotted key, for example
``config/cartpole.yaml: algorithm.config.gamma=1.3 must be in [0, 1]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from titan_rl.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The source tree the package was installed from (editable) or runs in: where config/ lies."""
INF = math.inf


LEARNER_ONLY: dict[str, Any] = {"learner_only": True}
"""Field metadata of an `algorithm.config` key only the learner reads (a learning rate, a loss):
the services do not compare it across hosts (titan_rl/shared_keys.py), so a trainer restarted with
another value goes on with the same buffer and actors. An untagged key is compared."""


def range_metadata(lo: float, hi: float = INF, learner_only: bool = False) -> dict[str, Any]:
    """Field metadata: the value (or each value of a list) must lie in [lo, hi]; `learner_only`: see LEARNER_ONLY."""
    return {"range": (lo, hi), **(LEARNER_ONLY if learner_only else {})}


@dataclass(frozen=True)
class ServerConfig:
    """Where a service listens and how its peers reach it."""

    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 to accept connections from other hosts."""
    port: int = field(default=0, metadata=range_metadata(0, 65535))
    """0 lets the launcher pick a free port."""
    address: str = ""
    """host:port that peers dial; empty means host:port (set it when peers reach the service by a DNS name)."""

    @property
    def dial_address(self) -> str:
        return self.address or f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RolloutConfig(ServerConfig):
    num_workers: int = field(default=2, metadata=range_metadata(1, 256))
    """Worker processes, each stepping its own vector env."""
    envs_per_worker: int = field(default=8, metadata=range_metadata(1, 4096))
    env_name: str = "CartPole-v1"
    """Any registered Gymnasium id with a Box observation and a Discrete action space."""
    replica_id: int = field(default=0, metadata=range_metadata(0))
    """Which rollout replica this is, when several feed one buffer: seeds and worker ids differ per replica
    (a worker's id, replica_id x num_workers + its index, must fit the wire's int32)."""
    vector_steps_per_chunk: int = field(default=32, metadata=range_metadata(1))
    """Vector-env steps a worker gathers into one message to the buffer: a chunk holds this many steps of
    each of its envs, so messages grow with envs_per_worker (fewer, bigger messages cost less per
    transition) while how far data lags the policy, in steps per env, stays the same."""
    chunk_max_delay_s: float = field(default=0.02, metadata=range_metadata(0))
    """A worker sends what it has once its oldest unsent transition is this old, so small or throttled
    collection still reaches the learner fresh; 0 sends after every vector step."""
    max_unacked_rows: int = field(default=512, metadata=range_metadata(1))
    """Records a worker may have sent and not yet seen acknowledged: what waits for redelivery while the
    buffer is unreachable (acting pauses when it is full), and how stale a rate-limited worker's data gets."""


@dataclass(frozen=True)
class BufferConfig(ServerConfig):
    capacity_items: int = field(default=100_000, metadata=range_metadata(1))
    """Size of a replay table, in records (a transition for DQN); queues size themselves (see the algorithm)."""
    rate_limit_slack_items: int = field(default=2_000, metadata=range_metadata(0))
    """How far (in records) collection may run ahead of, or behind, train.updates_per_env_step on a replay table."""


@dataclass(frozen=True)
class ClassSpec:
    """A class chosen by dotted path, built with keyword arguments."""

    path: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AlgorithmSpec:
    """The algorithm class (a titan_rl.algorithm.Algorithm) and its own config section.

    `config` is validated against the class's `Config` dataclass when the file is loaded, so an
    unknown key names file and key (`algorithm.config.n_stepp`) before any process starts.
    """

    path: str = ""
    config: Any = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """The learner loop, whatever the algorithm."""

    batch_size: int = field(default=64, metadata=range_metadata(1))
    """Records per update: transitions for DQN, segments for IMPALA."""
    min_buffer_size: int = field(default=1_000, metadata=range_metadata(1))
    """Records stored in a replay table before the first update."""
    updates_per_env_step: float = field(default=0.5, metadata=range_metadata(0.0001, 1000))
    """Update-to-data ratio of a replay table (updates per stored record), enforced by its rate limiter."""
    policy_sync_every_updates: int = field(default=50, metadata=range_metadata(1))
    """Publish new weights to rollout every this many updates."""
    rows_per_request: int = field(default=2048, metadata=range_metadata(1, 1_000_000))
    """Transitions the buffer samples and sends in one message, as whole batches (at least one).

    Sized in rows rather than batches so a message stays about as big whatever the batch size:
    per-message costs want it large, and the copies of one huge message stop overlapping."""
    prefetch_requests: int = field(default=2, metadata=range_metadata(1, 64))
    """Sample requests kept in flight so the learner never waits on the network."""
    torch_threads: int = field(default=1, metadata=range_metadata(1, 256))
    device: str = field(default="cpu", metadata={"choices": ("cpu", "cuda", "auto")})
    """Where the learner computes: cpu, cuda (fails at start where torch sees no GPU) or auto (a GPU if
    there is one). Batches reach a GPU through pinned memory; actors and evaluation stay on the CPU."""
    learners: int = field(default=1, metadata=range_metadata(1, 64))
    """Data-parallel learner processes (torch.distributed: gloo on CPU, NCCL on GPU): each samples its
    own batches and they average gradients, so an optimizer step sees learners x batch_size rows while
    updates_per_env_step keeps counting optimizer steps. Replay tables only."""
    learner_group_address: str = ""
    """host:port where rank 0 (the trainer) meets the other learners. Empty: the trainer starts ranks
    1..learners-1 on its own host. Set: each rank runs on a host of its own
    (`python -m titan_rl.trainer.learner --rank R`) and dials it; the trainer listens on its port."""

    def batches_per_request(self, batch_size: int | None = None) -> int:
        """Whole batches of `batch_size` (default: this config's) in one sample message."""
        return max(1, self.rows_per_request // (batch_size or self.batch_size))


@dataclass(frozen=True)
class EvalConfig:
    interval_env_steps: int = field(default=2_500, metadata=range_metadata(1))
    episodes: int = field(default=20, metadata=range_metadata(1, 10_000))


@dataclass(frozen=True)
class BudgetConfig:
    max_env_steps: int = field(default=100_000, metadata=range_metadata(1))
    max_wall_s: float = field(default=900.0, metadata=range_metadata(0))
    """0 means no wall-clock limit."""
    target_eval_return: float | None = 495.0
    """Stop once the greedy evaluation mean reaches this (confirmed on as many new episodes); null to train the whole budget."""


@dataclass(frozen=True)
class LoggingConfig:
    wandb_mode: str = field(default="offline", metadata={"choices": ("offline", "online", "disabled")})
    """Used when the WANDB_MODE environment variable is unset."""
    wandb_project: str = field(default="titan-rl", metadata={"excludes": "/\\#?%:"})
    """W&B refuses these characters in a project name."""
    run_dir: str = "runs"
    """Each run writes runs/<run_name>/metrics.jsonl."""
    run_name: str = ""
    """Empty: <env>-seed<seed>-<timestamp>. One folder name (RUN_NAME): every file of the run goes under <run_dir>/<run_name>."""
    checkpoint_path: str = "checkpoint.pth"
    """Best-evaluated policy; the last one goes beside it as <stem>_last.pth."""
    console: bool = True
    """Live progress on the terminal."""
    log_interval_s: float = field(default=1.0, metadata=range_metadata(0.01))
    tensorboard: bool = False
    """Also write TensorBoard events to <run_dir>/<run_name>/tensorboard (`tensorboard --logdir runs`)."""
    video: bool = True
    """At the end of a run, record one greedy episode of the best checkpoint to <run_dir>/<run_name>/video.mp4
    (and to W&B)."""


@dataclass(frozen=True)
class DurabilityConfig:
    """What survives a process dying: replay snapshots, periodic checkpoints, how long a peer may be gone."""

    snapshot_path: str = ""
    """The buffer's tables on disk; empty: <run_dir>/<run_name>/buffer_snapshot.npz, or none without a run_name."""
    snapshot_interval_s: float = field(default=30.0, metadata=range_metadata(0))
    """The buffer saves its tables this often (0: only when it stops cleanly) and restores them at start."""
    checkpoint_interval_s: float = field(default=30.0, metadata=range_metadata(0))
    """The trainer writes <stem>_last.pth this often (0: only at the end), for resuming."""
    peer_timeout_s: float = field(default=300.0, metadata=range_metadata(1))
    """A service whose peer stays unreachable this long exits non-zero, naming it."""


@dataclass(frozen=True)
class SecurityConfig:
    token: str = ""
    """Shared token every RPC but health must carry; the TITAN_RL_TOKEN environment variable wins. Empty: no check
    (bash run.sh makes a random one per run for its own services)."""
    tls_cert_file: str = ""
    """PEM certificate (chain) this service serves with and, under mutual TLS, presents as a client; set with
    tls_key_file to turn TLS on for every server and channel. Empty: plaintext."""
    tls_key_file: str = ""
    """PEM private key of tls_cert_file."""
    tls_ca_file: str = ""
    """PEM CA certificate(s) that clients verify servers with (empty: gRPC's bundled public roots) and that
    servers verify client certificates with under tls_client_auth."""
    tls_client_auth: bool = False
    """Mutual TLS: servers refuse clients without a certificate signed by tls_ca_file (needs tls_ca_file)."""


@dataclass(frozen=True)
class Config:
    seed: int = field(default=0, metadata=range_metadata(0, 2**32 - 1))
    rollout_server: RolloutConfig = field(default_factory=lambda: RolloutConfig(port=50051))
    buffer_server: BufferConfig = field(default_factory=lambda: BufferConfig(port=50052))
    trainer_server: ServerConfig = field(default_factory=lambda: ServerConfig(port=50053))
    policy: ClassSpec = field(default_factory=lambda: ClassSpec("models.simple_policy.SimplePolicy"))
    algorithm: AlgorithmSpec = field(default_factory=lambda: AlgorithmSpec("trainers.dqn.DQN"))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    durability: DurabilityConfig = field(default_factory=DurabilityConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def snapshot_path(self) -> Path | None:
        """Where the buffer keeps its snapshot, or None (no path and no run name to derive one from)."""
        if self.durability.snapshot_path:
            return Path(self.durability.snapshot_path)
        if self.logging.run_name:
            return Path(self.logging.run_dir) / self.logging.run_name / "buffer_snapshot.npz"
        return None


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _number(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _check_value(where: str, key: str, value: Any, f: dataclasses.Field, hint: Any) -> Any:
    if not _type_ok(value, hint):
        raise ConfigError(f"{where}: {key}={value!r} must be of type {_type_name(hint)}")
    if hint is float or (isinstance(value, int) and float in typing.get_args(hint)):
        value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    lo, hi = f.metadata.get("range", (-INF, INF))
    numbers = value if isinstance(value, list) else [value]
    for number in numbers:
        if "range" in f.metadata and isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(f"{where}: {key}={value!r} must be a finite number")
        if isinstance(number, (int, float)) and not isinstance(number, bool) and not lo <= number <= hi:
            bound = f"[{_number(lo)}, {_number(hi)}]" if hi != INF else f">= {_number(lo)}"
            raise ConfigError(f"{where}: {key}={value!r} must be {'in ' if hi != INF else ''}{bound}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {key}={value!r} must be one of {', '.join(choices)}")
    if isinstance(value, str) and (held := [c for c in f.metadata.get("excludes", "") if c in value]):
        raise ConfigError(f"{where}: {key}={value!r} must not contain {' '.join(held)}")
    return value


_MOVED_TO_ALGORITHM = (
    "train.lr",
    "train.gamma",
    "train.target_update_every_updates",
    "train.target_update_tau",
    "train.max_grad_norm",
    "train.double_q",
    "train.n_step",
    "rollout_server.epsilon_start",
    "rollout_server.epsilon_decay_env_steps",
)
_RENAMED = {
    "train.batches_per_request": "renamed: train.rows_per_request counts rows, i.e. batches x batch_size",
    "rollout_server.transitions_per_chunk": "renamed: rollout_server.vector_steps_per_chunk counts steps of each env, "
    "i.e. transitions / envs_per_worker",
    "trainer": "replaced by algorithm.path (e.g. trainers.dqn.DQN) and algorithm.config",
    "rollout_server.epsilon": "moved: algorithm.config.epsilon_final (exploration belongs to the algorithm)",
    "buffer_server.capacity_transitions": "renamed: buffer_server.capacity_items",
    "buffer_server.rate_limit_slack_transitions": "renamed: buffer_server.rate_limit_slack_items",
    **{key: f"moved: algorithm.config.{key.rpartition('.')[2]}" for key in _MOVED_TO_ALGORITHM},
}
"""Keys of earlier versions: renaming alone would silently change behaviour or leave them unread."""


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'the file'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    values: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known keys: {', '.join(fields)})"
            hint = f" ({_RENAMED[dotted]})" if dotted in _RENAMED else hint
            raise ConfigError(f"{where}: unknown key {dotted}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict | None):
                raise ConfigError(f"{where}: {dotted} must be a mapping of keys, got {value!r}")
            values[key] = _build(hint, {**_as_dict(getattr(defaults, key)), **(value or {})}, where, dotted + ".")
        else:
            values[key] = _check_value(where, dotted, value, fields[key], hint)
    return dataclasses.replace(defaults, **values)


def _as_dict(section: Any) -> dict[str, Any]:
    """A section's own fields, shallowly (nested dataclasses are rebuilt by _build)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.batch_size=32` -> ("train.batch_size", 32); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e


def resolve_config_path(path: str | Path) -> Path:
    """`path` itself when it exists or is absolute; otherwise the same relative path in the project's
    source tree when it is there: `config/cartpole.yaml` then works from any directory."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    shipped = PROJECT_ROOT / path
    return shipped if shipped.exists() else path


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a key written twice in one mapping: YAML keeps the last one
    without a word, so an edit above a forgotten second line of the same key would do nothing.

    Checked on each mapping as written, before its merge keys (`<<: *anchor`) are flattened into
    it: a merged key that the mapping overrides is what merging is for."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._checked:  # flattening rewrites the node in place, and a merged node is flattened again later
            self._checked.add(id(node))
            first_seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)  # `on` and `yes`, `1` and `01`: one key once read
                if key in first_seen:
                    first = first_seen[key]
                    raise yaml.constructor.ConstructorError(
                        f"the key {first.value!r} is written here",
                        first.start_mark,
                        f"and again as {key_node.value!r} here",
                        key_node.start_mark,
                    )
                first_seen[key] = key_node
        super().flatten_mapping(node)


def _read_yaml(text: str, name: str) -> Any:
    """The document in `text`, its errors pointing into the file `name`."""
    loader = _UniqueKeyLoader(text)
    loader.name = name  # "<unicode string>" otherwise
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (see `resolve_config_path`), apply `key=value` overrides and validate everything.

    Example:
        >>> cfg = load_config("config/cartpole.yaml", ["algorithm.config.lr=0.0005", "seed=3"])
    """
    path = resolve_config_path(path)
    try:
        raw = _read_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such config file") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{path}: a folder, not a config file") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}): not a YAML config") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return config_from_dict(raw, str(path))


def config_from_dict(raw: dict[str, Any], where: str = "<config>", allowed_modules: tuple[str, ...] | None = None) -> Config:
    """Validate a config tree, the algorithm's own section included.

    `allowed_modules` restricts the packages `policy.path` and `algorithm.path` may name (a
    config read from a checkpoint is data, and importing a module runs its code).
    """
    cfg = _build(Config, raw, where, "")
    _check_cross_fields(cfg, where)
    from titan_rl.registry import algorithm_class, check_env_module_allowed, check_module_allowed  # the registry imports this module

    if allowed_modules is not None:
        for name in ("policy", "algorithm"):
            check_module_allowed(getattr(cfg, name).path, f"{where}: {name}.path", allowed_modules)
        check_env_module_allowed(cfg.rollout_server.env_name, f"{where}: rollout_server.env_name", allowed_modules)
    cls = algorithm_class(cfg.algorithm.path, where)
    section = cfg.algorithm.config
    if not isinstance(section, cls.Config):
        typed = build_section(cls.Config, section or {}, where, "algorithm.config.")
        cfg = dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, config=typed))
    cls.check_config(cfg, where)
    return cfg


def build_section(cls: type, data: Any, where: str, prefix: str) -> Any:
    """One dataclass section from YAML data, validated as every section of the file is."""
    return _build(cls, data, where, prefix)


MAX_WORKER_ID = 2**31 - 1
"""A worker's id over every replica travels as an int32."""
TOKEN = re.compile(r"[!-~]([ -~]{0,4094}[!-~])?")
TOKEN_RULE = "must be 1 to 4096 printable ASCII characters, not starting or ending with a space, as gRPC metadata carries it"
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+,@-]{0,199}")
"""A run name: one folder under `logging.run_dir`, never a path (it may come from a checkpoint, with `--resume`)."""


def default_run_name(cfg: Config) -> str:
    """<env>-seed<seed>-<timestamp>, the env id made a folder name (`module:Space/Game-v1` -> `Space-Game-v1`)."""
    env = re.sub(r"[^A-Za-z0-9._-]", "-", cfg.rollout_server.env_name.rpartition(":")[2])
    return f"{env}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_cross_fields(cfg: Config, where: str) -> None:
    if cfg.logging.run_name and not RUN_NAME.fullmatch(cfg.logging.run_name):
        raise ConfigError(
            f"{where}: logging.run_name={cfg.logging.run_name!r} must be one folder name: letters, digits and ._=+,@- "
            "(not first), at most 200"
        )
    if cfg.security.token and not TOKEN.fullmatch(cfg.security.token):
        raise ConfigError(f"{where}: security.token {TOKEN_RULE}")
    r = cfg.rollout_server
    if (r.replica_id + 1) * r.num_workers - 1 > MAX_WORKER_ID:
        raise ConfigError(
            f"{where}: rollout_server.replica_id={r.replica_id} with num_workers={r.num_workers} gives worker ids past {MAX_WORKER_ID} "
            "(they travel as int32)"
        )
    for name in ("policy", "algorithm"):
        spec = getattr(cfg, name)
        if "." not in spec.path:
            raise ConfigError(f"{where}: {name}.path={spec.path!r} must be a dotted path like module.Class")
    if cfg.train.min_buffer_size > cfg.buffer_server.capacity_items:
        capacity = cfg.buffer_server.capacity_items
        raise ConfigError(f"{where}: train.min_buffer_size={cfg.train.min_buffer_size} exceeds buffer_server.capacity_items={capacity}")
    if group := cfg.train.learner_group_address:
        if not _is_host_port(group):
            raise ConfigError(f"{where}: train.learner_group_address={group!r} must be host:port with a port in 1..65535")
        if cfg.train.learners < 2:
            raise ConfigError(f"{where}: train.learner_group_address={group!r} is set but train.learners=1: there is no group to meet")
    if cfg.train.batch_size > cfg.train.min_buffer_size:
        raise ConfigError(f"{where}: train.batch_size={cfg.train.batch_size} exceeds train.min_buffer_size={cfg.train.min_buffer_size}")


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 1 <= int(port) <= 65535


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain dict of built-in types: YAML-dumpable and safe for torch.load(weights_only=True)."""
    return dataclasses.asdict(cfg)


def shareable_config_dict(cfg: Config) -> dict[str, Any]:
    """`config_to_dict` with the shared token blanked out: what goes to the run folder and W&B."""
    tree = config_to_dict(cfg)
    if tree["security"]["token"]:
        tree["security"]["token"] = "<redacted>"
    return tree
