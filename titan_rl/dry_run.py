"""Act with an algorithm before a run starts: in the configured env, with the untrained network,
until its adder writes its first records, which are checked against its own `record_spec()` and
table as the buffer will check them. A plugin whose actor, adder and record spec disagree (a field
written but not declared, or declared but not written, a wrong shape or dtype, a value outside its
bounds) is refused by the launcher's preflight naming the field, instead of every chunk being
refused once the services are up.

The learner is not tried here: building any torch optimizer imports torch._dynamo, 1.2 s more on
the launch's path to the first update. A learner that fails stops the trainer at its first update
with the error (`Learner.update` also refuses a prioritized batch left without new priorities).
"""

from __future__ import annotations

import copy

import numpy as np
from torch import nn

from titan_rl.algorithm import Algorithm
from titan_rl.buffer.storage import RingStorage
from titan_rl.config import Config
from titan_rl.errors import ConfigError, ShapeMismatchError, TitanError
from titan_rl.rollout.actor import VectorActor

MAX_VECTOR_STEPS = 4096
"""Steps of the vector env to wait for the adder's first records (a long on-policy segment); none by then: no verdict."""

Records = dict[str, np.ndarray]


def dry_run(cfg: Config, algorithm: Algorithm, network: nn.Module) -> None:
    """ConfigError, naming `algorithm.path`, unless the first records fit the algorithm's table.
    Acts with a copy of `network` in eval mode, as rollout workers do (a batch-norm layer in
    training mode refuses a batch of one observation)."""
    records = first_records(cfg, algorithm, copy.deepcopy(network).eval())
    if records is not None:
        check_records(cfg, algorithm, records)


def first_records(cfg: Config, algorithm: Algorithm, network: nn.Module) -> Records | None:
    """The first non-empty records of worker 0 acting with `network`, or None if none came within MAX_VECTOR_STEPS."""
    r, where = cfg.rollout_server, f"algorithm.path={cfg.algorithm.path!r} with policy.path={cfg.policy.path!r}"
    try:
        actor = VectorActor(
            r.env_name, r.envs_per_worker, algorithm.make_actor(network, 0, cfg.seed), algorithm.make_adder(r.envs_per_worker), cfg.seed
        )
    except TitanError:
        raise
    except Exception as e:  # a plugin's own code: any error is its bug, reported, not a traceback
        raise ConfigError(f"{where}: cannot make its actor and adder: {type(e).__name__}: {e}") from e
    try:
        for _ in range(MAX_VECTOR_STEPS):
            records = actor.step().records
            if len(next(iter(records.values()), ())):
                return records
        return None
    except TitanError:
        raise
    except Exception as e:
        raise ConfigError(f"{where}: acting in {r.env_name} failed: {type(e).__name__}: {e}") from e
    finally:
        actor.close()


def check_records(cfg: Config, algorithm: Algorithm, records: Records) -> None:
    table = algorithm.table()
    storage = RingStorage(1, algorithm.record_spec())
    try:
        storage.validate(records)
        storage.check_values(records, table.value_bounds, table.non_finite_fields)
    except ShapeMismatchError as e:
        written = ", ".join(f"{name} {a.dtype}{list(a.shape[1:])}" for name, a in records.items())
        raise ConfigError(
            f"algorithm.path={cfg.algorithm.path!r}: the records its adder writes ({written}) do not fit its record_spec(): {e}"
        ) from e
