"""The algorithm contract: one object decides what the three services do with their data.

An `Algorithm` is chosen in YAML (`algorithm.path`) and built in every process from the same
config. It supplies four roles, and the services know nothing else about it:

- the acting policy (`make_actor`): `act(obs) -> (actions, extras)`, exploration included,
  run by rollout workers; its schedules follow the buffer-wide env-step count that travels
  with the weights;
- the records actors write (`record_spec`, `make_adder`): field names, dtypes and shapes,
  which the buffer's table enforces, and the adder that turns env steps into records
  (n-step transitions, trajectory segments);
- the table it learns from (`table`): uniform or prioritized replay, or a FIFO queue, each
  with its rate limiter, served by the buffer;
- the learner (`make_learner`): `update(batch) -> metrics` in the trainer.

The loop, in one worker and the trainer:

    actor, adder = algo.make_actor(network, worker_index, seed), algo.make_adder(num_envs)
    actions, extras = actor.act(obs)                      # rollout worker
    records = adder.add(EnvStep(obs, actions, ..., extras))  # -> buffer table
    metrics = learner.update(batch)                        # trainer, batches from the table

`OffPolicyAlgorithm` (titan_rl.off_policy) and `OnPolicyAlgorithm` (titan_rl.on_policy) fill
most of this in; a new algorithm is usually one of them plus a learner.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from titan_rl.config import Config as RunConfig
from titan_rl.errors import ConfigError

RecordSpec = dict[str, tuple[tuple[int, ...], np.dtype]]
"""Per-record (shape, dtype) of every field a table stores."""


@dataclass(frozen=True)
class EnvSpec:
    """What an algorithm needs to know of the environment's spaces."""

    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    n_actions: int


@dataclass(frozen=True)
class TableSpec:
    """One table of the buffer, as the algorithm wants it.

    `uniform` and `prioritized` are replay tables: a ring of `capacity_items` records that
    overwrites the oldest, sampled with replacement, with a sample-to-insert rate limiter.
    `fifo` is a queue: each record is handed out once, oldest first; inserts wait while it is
    full, and records acted by a policy more than `max_policy_lag` versions old are dropped.
    """

    kind: Literal["uniform", "prioritized", "fifo"]
    capacity_items: int
    name: str = "default"
    samples_per_insert: float = 1.0
    """Replay tables: sampled rows per inserted record that the rate limiter holds them to."""
    min_size_to_sample: int = 1
    slack_items: int = 0
    """Replay tables: how far, in records, either side may drift from `samples_per_insert`."""
    priority_exponent: float = 0.6
    """Prioritized: alpha, how strongly priorities skew sampling (0 = uniform)."""
    importance_exponent_start: float = 0.4
    """Prioritized: beta at env step 0, annealed linearly to 1 at `importance_anneal_env_steps`."""
    importance_anneal_env_steps: int = 100_000
    max_policy_lag: int = 0
    """FIFO: drop records acted by weights more than this many versions older than the learner's (0 = keep all)."""
    value_bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Inclusive [low, high] of a field's values (e.g. the action of an env with n actions: [0, n - 1]);
    inserts outside are refused naming the field. Every bool must be 0 or 1."""
    non_finite_fields: tuple[str, ...] = ()
    """Float fields that may hold nan or +-inf (a masked action's log-prob, say); every other float
    field must be finite, or the insert is refused naming it."""

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "prioritized", "fifo"):
            raise ValueError(f"table kind must be uniform, prioritized or fifo, got {self.kind!r}")
        if self.capacity_items < 1:
            raise ValueError(f"capacity_items must be >= 1, got {self.capacity_items}")


@dataclass
class EnvStep:
    """One step of a vector env of B envs, as an adder sees it.

    Rows where `valid` is False are autoreset steps (the env only reset): not transitions.
    `next_obs` is the true successor (the final observation at an episode's end).
    """

    obs: np.ndarray  # [B, *obs_shape]
    action: np.ndarray  # [B]
    reward: np.ndarray  # [B]
    next_obs: np.ndarray
    terminated: np.ndarray  # [B] bool
    truncated: np.ndarray  # [B] bool
    valid: np.ndarray  # [B] bool
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # from Actor.act, e.g. log_prob [B]


@dataclass
class Batch:
    """One sampled batch, handed to `Learner.update`.

    `fields` are the table's record fields as tensors ([batch, ...]); a prioritized table's batch
    also has `keys`, identifying the items (for UpdatePriorities), and importance-sampling `weights`.
    A learner of a prioritized table sets `new_priorities` (one per row); the loop sends them
    to the buffer off the learner's critical path.
    """

    fields: dict[str, torch.Tensor]
    keys: np.ndarray | None = None
    weights: torch.Tensor | None = None
    new_priorities: np.ndarray | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.fields[name]


class Actor(ABC):
    """The acting policy of one rollout worker: batched, exploration and its schedule included."""

    env_steps: int = 0
    """The buffer-wide env-step count, as received with the latest weights: schedules run on it."""

    @abstractmethod
    def act(self, obs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Actions for a batch of observations [B, *obs_shape], and per-step extras (each [B, ...]) for the adder."""

    def metrics(self) -> dict[str, float]:
        """The acting state worth reporting (e.g. the current epsilon)."""
        return {}


class Adder(ABC):
    """Turns a vector env's steps into the records an algorithm's table stores."""

    @abstractmethod
    def add(self, step: EnvStep) -> dict[str, np.ndarray]:
        """Records completed by this step, as equal-length arrays per field (possibly zero rows)."""


class Learner(ABC):
    """Improves `network` from sampled batches.

    `update` converts the wire batch and counts updates, then calls `_update`. A subclass that
    sets `optimizer` gets its state saved and restored; one with more state (a target network)
    extends `state_dict`/`load_state_dict`. Everything `state_dict` returns must be tensors,
    numbers, strings and containers of them, so checkpoints load with `torch.load(weights_only=True)`.
    """

    env_steps: int = 0
    """The run's env-step count (counted by the buffer over every actor) when the batch being
    learned from was sampled: schedules (a learning rate's decay) run on it, the clock the actors'
    exploration follows. Data-parallel ranks all take rank 0's."""

    def __init__(self, network: nn.Module):
        self.network = network
        self.updates = 0
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def device(self) -> torch.device:
        """Where the network is, and so where batches go (`train.device`): a learner creates its
        tensors there too (`torch.arange(n, device=...)`)."""
        return next(self.network.parameters()).device

    def update(self, batch: Batch | Mapping[str, np.ndarray]) -> dict[str, float]:
        """One learning step; returns scalar metrics (`losses/...`). A batch of a prioritized table
        (it has importance `weights`) must come back with one new priority per row."""
        if not isinstance(batch, Batch):
            batch = to_batch(batch, device=self.device)
        metrics = self._update(batch)
        shape = None if batch.new_priorities is None else tuple(batch.new_priorities.shape)
        if batch.weights is not None and shape != (len(batch.weights),):
            got = "none" if shape is None else f"shape {shape}"
            raise ConfigError(
                f"{type(self).__name__} learned from a batch of a prioritized table but set no new priority per row "
                f"(batch.new_priorities: {got}, want shape ({len(batch.weights)},)): every item would keep the priority it was "
                "inserted with, which is uniform replay. Set them in _update, or replay uniformly (algorithm.config.replay)"
            )
        self.updates += 1
        return metrics

    @abstractmethod
    def _update(self, batch: Batch) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]:
        state = {"policy": self.network.state_dict(), "updates": self.updates}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Weights, update count and the optimizer's state (its moments) come from `state`; the
        optimizer's settings (learning rate, betas, ...) stay this learner's, as its config made
        them: a run resumed with another `lr` learns at that rate."""
        self.network.load_state_dict(state["policy"])
        self.updates = int(state["updates"])
        if self.optimizer is not None:
            settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(state["optimizer"])
            for group, configured in zip(self.optimizer.param_groups, settings, strict=True):
                group.update(configured)


def cpu_state(tree: Any, copy: bool = False) -> Any:
    """A learner state (tensors in dicts, lists and tuples) with every tensor on the CPU, where
    checkpoints, the evaluator and published weights want them whatever `train.device` is; `copy`:
    CPU tensors are copied too, so later updates do not change the result."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=copy)
    if isinstance(tree, dict):
        out = type(tree)((key, cpu_state(value, copy)) for key, value in tree.items())
        if hasattr(tree, "_metadata"):  # a module's state_dict: versions load_state_dict reads
            out._metadata = dict(tree._metadata)
        return out
    if isinstance(tree, list | tuple):
        return type(tree)(cpu_state(value, copy) for value in tree)
    return tree


def to_batch(
    rows: Mapping[str, np.ndarray], keys: np.ndarray | None = None, weights: np.ndarray | None = None, device: torch.device | None = None
) -> Batch:
    """Arrays as a Batch of tensors on `device` (default: the CPU), copied once, since arrays decoded
    from the wire are read-only views. To a GPU the one host copy goes into pinned memory, from which
    the transfer is a DMA that does not block this thread (pageable memory would take a second,
    blocking copy)."""
    if device is None or device.type == "cpu":
        to_tensor = _cpu_tensor
    else:

        def to_tensor(a: np.ndarray) -> torch.Tensor:
            return _pinned_tensor(a).to(device, non_blocking=True)

    fields = {name: to_tensor(a) for name, a in rows.items()}
    return Batch(fields, keys, None if weights is None else to_tensor(np.asarray(weights, np.float32)))


def _cpu_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a))


def _pinned_tensor(a: np.ndarray) -> torch.Tensor:
    staged = torch.empty(a.shape, dtype=torch.from_numpy(np.empty(0, a.dtype)).dtype, pin_memory=True)
    staged.numpy()[...] = a
    return staged


class Algorithm(ABC):
    """Builds every role of one algorithm from the shared config; see the module docstring.

    A subclass sets `Config` to a frozen dataclass: the YAML section `algorithm.config` is
    validated against it (unknown keys, types, `metadata` ranges), and `self.config` holds it.
    """

    Config: ClassVar[type] = dataclasses.make_dataclass("NoConfig", [], frozen=True)

    def __init__(self, cfg: RunConfig, env: EnvSpec):
        self.cfg = cfg
        self.config = cfg.algorithm.config
        self.env = env

    @classmethod
    def check_config(cls, cfg: RunConfig, where: str) -> None:
        """Checks across sections (raise ConfigError naming keys and `where`); called when the file loads."""
        return None

    @abstractmethod
    def record_spec(self) -> RecordSpec:
        """The fields every record holds: what actors send and the buffer enforces."""

    @abstractmethod
    def table(self) -> TableSpec: ...

    @abstractmethod
    def make_actor(self, network: nn.Module, worker_index: int, seed: int) -> Actor:
        """The acting policy of worker `worker_index` of its rollout replica, acting with `network`."""

    @abstractmethod
    def make_adder(self, num_envs: int) -> Adder: ...

    @abstractmethod
    def make_learner(self, network: nn.Module) -> Learner: ...

    @abstractmethod
    def greedy_actions(self, network: nn.Module, obs: np.ndarray) -> np.ndarray:
        """The deterministic action for each observation: what evaluation and visualize.py play."""

    def tiny_network(self) -> nn.Module:
        """A small network this algorithm learns with on the configured env: what the contract tests
        (tests/test_algorithms.py) build it with. Subclasses of a shipped algorithm inherit its own."""
        raise NotImplementedError(f"{type(self).__name__} defines no tiny_network(): the contract tests need one")

    def check_network(self, network: nn.Module) -> None:
        """One forward on two dummy observations; a network that does not fit raises ConfigError."""
        obs = np.zeros((2, *self.env.obs_shape), self.env.obs_dtype)
        try:
            actions = self.greedy_actions(network, obs)
        except Exception as e:  # the network's and the algorithm's own code: whatever it raises, they do not fit
            raise ConfigError(
                f"policy.path={self.cfg.policy.path!r} does not fit {type(self).__name__} on observations {obs.shape[1:]}: {e}"
            ) from e
        if np.shape(actions) != (2,):
            raise ConfigError(f"policy.path={self.cfg.policy.path!r}: {type(self).__name__} got actions of shape {np.shape(actions)}")
        if not any(p.requires_grad for p in network.parameters()):
            raise ConfigError(f"policy.path={self.cfg.policy.path!r} has no trainable parameters: {type(self).__name__} cannot learn it")

    def check_action_scores(self, network: nn.Module, scores: Callable[[nn.Module, torch.Tensor], torch.Tensor], what: str) -> None:
        """ConfigError unless `scores(network, obs)` (what the actions are the argmax of) is [B, n_actions]:
        a network with more outputs than the env has actions would act outside its action space."""
        obs = torch.as_tensor(np.zeros((2, *self.env.obs_shape), self.env.obs_dtype))
        with torch.no_grad():
            shape = tuple(scores(network, obs).shape)
        if shape != (2, self.env.n_actions):
            raise ConfigError(
                f"policy.path={self.cfg.policy.path!r}: {type(self).__name__} reads {what} of shape {list(shape[1:])} per observation, "
                f"but rollout_server.env_name={self.cfg.rollout_server.env_name!r} has {self.env.n_actions} actions"
            )
