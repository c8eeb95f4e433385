"""The config keys two services of one run both read, compared on every call between them.

Each service loads its own YAML, on its own host. A key more than one of them reads can differ
between the files without anything failing: a rollout replica on CartPole-v0 fills a CartPole-v1
run's replay with episodes cut at 200 steps; actors that fold 1-step returns into records a learner
bootstraps as 3-step ones; a trainer of another `logging.run_name` learns from the replay of the
buffer's run. So a service's calls carry its values of the keys it reads (`METADATA_KEY`, compact
JSON, set by `use_shared_keys`), and a server refuses a call whose values differ from its own in a
key both read, FAILED_PRECONDITION naming each such key and both values. Calls that carry none
(control tools, `visualize.py`, tests) are not checked.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Callable
from typing import Any

import grpc

from titan_rl.auth import HEALTH_PREFIX
from titan_rl.config import Config, config_to_dict
from titan_rl.interceptors import metadata_value, refusing_handler

ENV = "TITAN_RL_SHARED_KEYS"  # in the environment, so that the service's workers and learner ranks send it too
METADATA_KEY = "titan-shared-keys"
_ALGORITHM = ("rollout_server.env_name", "algorithm.path", "algorithm.config")  # the spaces, records and schedules
_NETWORK = ("policy.path", "policy.kwargs")  # the trainer's weights load into the workers' network
_REPLAY = (
    "train.batch_size",  # the rate limiter's samples per insert, and the trainer's batches
    "train.min_buffer_size",
    "train.updates_per_env_step",
    "train.learners",
    "budget.max_env_steps",  # prioritized replay anneals its importance weights over it (by default)
    "logging.run_name",  # the buffer's snapshot and the trainer's checkpoints: one run
)
# a value that, at the server, accepts any caller's: a buffer started without a run name (which
# keeps no snapshot) serves a trainer of any run, such as one resumed by hand with `--resume`
SERVER_UNSET_IS_ANY = {"logging.run_name": ""}
READS: dict[str, tuple[str, ...]] = {
    "rollout": _ALGORITHM + _NETWORK,
    "buffer": _ALGORITHM + _REPLAY,
    "trainer": _ALGORITHM + _NETWORK + _REPLAY,
}
_MAX_NAMED = 5  # differences named in one refusal
NOT_SET = object()  # a leaf one side lacks


def shared_values(cfg: Config, role: str) -> dict[str, Any]:
    """The keys `role` reads, flattened to leaves (`algorithm.config.gamma`), as JSON gives them back;
    without the algorithm's LEARNER_ONLY keys, which no two services that talk both read, and
    `policy.kwargs` without the keywords given at the network's own defaults."""
    tree = config_to_dict(cfg)
    if "policy.kwargs" in READS[role]:
        tree["policy"]["kwargs"] = network_kwargs(cfg)
    leaves: dict[str, Any] = {}
    for key in READS[role]:
        value: Any = tree
        for part in key.split("."):
            value = value[part]
        _flatten(key, value, leaves)
    algorithm = cfg.algorithm.config
    if dataclasses.is_dataclass(algorithm):
        for f in dataclasses.fields(algorithm):
            if f.metadata.get("learner_only"):
                leaves.pop(f"algorithm.config.{f.name}", None)
    return _as_json(leaves)


def network_kwargs(cfg: Config) -> dict[str, Any]:
    """`policy.kwargs` without the keywords given at the network constructor's own default: a keyword
    spelled out at its default on one host and left out on another builds the same network, and was
    refused as "(not set)". Defaults themselves are never sent (one that is a function or an object
    reads differently in every process). A constructor whose signature cannot be read keeps them all."""
    from torch import nn

    from titan_rl.registry import import_class

    kwargs = dict(cfg.policy.kwargs)
    try:
        parameters = inspect.signature(import_class(cfg.policy.path, "policy", nn.Module)).parameters
    except (TypeError, ValueError):
        return kwargs
    return {
        name: value
        for name, value in kwargs.items()
        if name not in parameters
        or parameters[name].default is inspect.Parameter.empty
        or _as_json(value) != _as_json(parameters[name].default)
    }


def _as_json(value: Any) -> Any:
    """`value` as JSON gives it back (tuples as lists, anything else JSON lacks as its text)."""
    return json.loads(json.dumps(value, default=str))


def _flatten(key: str, value: Any, into: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for name, inner in value.items():
            _flatten(f"{key}.{name}", inner, into)
    else:
        into[key] = value


def use_shared_keys(cfg: Config, role: str) -> None:
    """Make this process (and its children) a `role` of the run `cfg` describes: its calls carry its
    values, and its server refuses calls whose values differ from them."""
    os.environ[ENV] = json.dumps({"role": role, "values": shared_values(cfg, role)}, separators=(",", ":"), sort_keys=True)


def shared_keys_header() -> tuple[str, str] | None:
    """The metadata this process's calls carry, None where it is not a service of a run."""
    value = os.environ.get(ENV)
    return (METADATA_KEY, value) if value else None


def differences(mine: dict[str, Any], theirs: dict[str, Any], my_role: str) -> list[tuple[str, Any, Any]]:
    """(key, their value, my value) for each leaf of a key both read whose values differ; a leaf one side
    lacks (an algorithm.config key of another version) differs, its value NOT_SET."""
    found = []
    for key in READS[my_role]:
        under = {leaf for leaf in (*mine, *theirs) if leaf == key or leaf.startswith(key + ".")}
        if not any(leaf in theirs for leaf in under):  # a key the caller does not read
            continue
        found += [(leaf, theirs.get(leaf, NOT_SET), mine.get(leaf, NOT_SET)) for leaf in sorted(under)]
    return [(leaf, theirs, mine) for leaf, theirs, mine in found if theirs != mine and SERVER_UNSET_IS_ANY.get(leaf, ...) != mine]


def _shown(value: Any) -> str:
    return "(not set)" if value is NOT_SET else json.dumps(value)


class SharedKeysServerInterceptor(grpc.ServerInterceptor):
    """Refuses calls whose `METADATA_KEY` values differ from this service's (`use_shared_keys`)."""

    def __init__(self, header: str):
        own = json.loads(header)
        self._role, self._values = own["role"], own["values"]
        self._agreeing = {header}  # headers already compared and found to agree

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        value = metadata_value(handler_call_details.invocation_metadata, METADATA_KEY)
        if handler is None or value is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        header = value.decode(errors="replace") if isinstance(value, bytes) else value
        if header in self._agreeing:
            return handler
        method = handler_call_details.method
        try:
            theirs = json.loads(header)
            role, values = str(theirs["role"]), dict(theirs["values"])
        except (ValueError, KeyError, TypeError):
            return refusing_handler(
                handler, grpc.StatusCode.INVALID_ARGUMENT, f"{method}: {METADATA_KEY} metadata: not the JSON a service sends"
            )
        if not (found := differences(self._values, values, self._role)):
            if len(self._agreeing) < 64:
                self._agreeing.add(header)
            return handler
        named = "; ".join(
            f"{key} is {_shown(theirs)} at the {role}, {_shown(mine)} at this {self._role}" for key, theirs, mine in found[:_MAX_NAMED]
        )
        more = f" (and {len(found) - _MAX_NAMED} more)" if len(found) > _MAX_NAMED else ""
        details = (
            f"{method}: this {self._role} and the calling {role} were started with different values of keys both read: "
            f"{named}{more}. Start every service of a run with the same values of the keys they share (titan_rl/shared_keys.py)"
        )
        return refusing_handler(handler, grpc.StatusCode.FAILED_PRECONDITION, details)
