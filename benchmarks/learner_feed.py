"""Learner feed: DQN updates/s when batches come over gRPC from the buffer service vs from an in-process buffer.

One DQNTrainer built from config/cartpole.yaml (its policy and train settings, batch 64, one torch
thread) runs `trainer.update(batch)` as fast as it can, with batches from:
  grpc:       BatchPrefetcher (the trainer's own client, the config's rows_per_request and
              prefetch_requests) on a real `python -m titan_rl.buffer` subprocess pre-filled with
              50,000 transitions, rate limiting effectively off;
  in-process: ReplayBuffer.sample(64) on a buffer in this process holding the same transitions (the baseline).
The two alternate, 3 repetitions of 5 s each; medians are compared.
Target: grpc >= 0.9x in-process.

    .venv/bin/python -m benchmarks.learner_feed [--quick]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from benchmarks.common import (
    CONFIG,
    alternate,
    buffer_service,
    cartpole_transitions,
    describe_mode,
    emit_json,
    fill_buffer,
    new_address,
    parse_args,
    print_table,
    rate_for,
    verdict,
)
from titan_rl.buffer.client import BatchPrefetcher
from titan_rl.buffer.replay import ReplayBuffer
from titan_rl.config import load_config
from titan_rl.registry import build, build_policy
from titan_rl.service import keep_freed_memory
from trainers.base import Trainer

TARGET = 0.9


def updates_rate(trainer: Trainer, next_batch: Callable[[], Mapping[str, np.ndarray]], duration_s: float) -> float:
    def one() -> int:
        trainer.update(next_batch())
        return 1

    return rate_for(one, duration_s, warmup_s=0.5)


def grpc_rate(trainer: Trainer, address: str, batch_size: int, per_request: int, prefetch: int, duration_s: float) -> float:
    prefetcher = BatchPrefetcher(address, batch_size, per_request, prefetch)

    def next_batch() -> Mapping[str, np.ndarray]:
        batch = prefetcher.next(timeout_s=30.0)
        if batch is None:
            raise RuntimeError("no batch from the buffer service within 30 s")
        return batch

    try:
        return updates_rate(trainer, next_batch, duration_s)
    finally:
        prefetcher.close()


def main() -> None:
    args = parse_args(__doc__)
    keep_freed_memory()  # this process is the client, as a rollout worker or the trainer is, and they call it too
    prefill, duration_s, reps = (5_000, 0.75, 2) if args.quick else (50_000, 5.0, 3)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(CONFIG)
    t = cfg.train
    trainer = build(cfg.trainer, "trainer", build_policy(cfg), t)
    data = cartpole_transitions(prefill)
    local = ReplayBuffer(cfg.buffer_server.capacity_transitions, seed=0)
    local.add(data)
    port, address = new_address()
    with buffer_service(port):
        fill_buffer(address, data)
        r = alternate(
            {
                "grpc": lambda: grpc_rate(trainer, address, t.batch_size, t.batches_per_request(), t.prefetch_requests, duration_s),
                "in_process": lambda: updates_rate(trainer, lambda: local.sample(t.batch_size).fields(), duration_s),
            },
            reps,
        )
    ratio = r["grpc"] / r["in_process"]
    mode = describe_mode(args.quick, reps, duration_s)
    hidden = cfg.policy.kwargs.get("hidden_sizes")
    print(f"\nlearner feed: DQN updates/s, batch {t.batch_size}, hidden {hidden}, 1 torch thread, {prefill:,} transitions; {mode}")
    print_table(["batches from", "updates/s"], [["buffer service (gRPC)", r["grpc"]], ["in-process ReplayBuffer", r["in_process"]]])
    print()
    met = verdict("grpc / in-process", ratio, TARGET)
    emit_json("learner_feed", args.quick, updates_per_s=r, ratio=ratio, target=TARGET, met=met)


if __name__ == "__main__":
    main()
