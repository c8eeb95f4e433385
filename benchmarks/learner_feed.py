"""Learner feed: DQN updates/s when batches come over gRPC from the buffer service vs from an in-process buffer.

One DQN learner built from config/cartpole.yaml (its algorithm, policy and train settings, batch 64,
one torch thread) runs `learner.update(to_batch(...))` as fast as it can, as the trainer's loop does,
with batches from:
  grpc:       BatchPrefetcher (the trainer's own client, the config's rows_per_request and
              prefetch_requests) on a real `python -m titan_rl.buffer` subprocess pre-filled with
              50,000 transitions, rate limiting effectively off;
  in-process: Table.sample(64) on a replay table in this process holding the same transitions
              (titan_rl.buffer.table, built as the service builds its own; the baseline).
The two alternate, 3 repetitions of 5 s each; medians are compared.
Target: grpc >= 0.9x in-process.

    .venv/bin/python -m benchmarks.learner_feed [--quick]
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    CONFIG,
    alternate,
    buffer_service,
    cartpole_transitions,
    describe_mode,
    emit_json,
    fill_buffer,
    in_process_table,
    new_address,
    parse_args,
    print_table,
    updates_rate,
    verdict,
)
from titan_rl.algorithm import Batch, Learner, to_batch
from titan_rl.clients.buffer import BatchPrefetcher
from titan_rl.config import load_config
from titan_rl.registry import build_algorithm, build_policy
from titan_rl.service import keep_freed_memory

TARGET = 0.9


def grpc_rate(learner: Learner, address: str, batch_size: int, per_request: int, prefetch: int, duration_s: float) -> float:
    prefetcher = BatchPrefetcher(address, batch_size, per_request, prefetch)

    def next_batch() -> Batch:
        sample = prefetcher.next(timeout_s=30.0)
        if sample is None:
            raise RuntimeError("no batch from the buffer service within 30 s")
        return to_batch(sample.fields, sample.keys, sample.weights)

    try:
        return updates_rate(learner, next_batch, duration_s)
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
    learner = build_algorithm(cfg).make_learner(build_policy(cfg))
    data = cartpole_transitions(prefill)
    local = in_process_table(cfg.buffer_server.capacity_items, seed=0)
    local.insert_fields(data)

    def local_batch() -> Batch:
        rows = local.sample(t.batch_size)
        return to_batch(rows.fields(), rows.keys, rows.weights)

    port, address = new_address()
    with buffer_service(port):
        fill_buffer(address, data)
        r = alternate(
            {
                "grpc": lambda: grpc_rate(learner, address, t.batch_size, t.batches_per_request(), t.prefetch_requests, duration_s),
                "in_process": lambda: updates_rate(learner, local_batch, duration_s),
            },
            reps,
        )
    ratio = r["grpc"] / r["in_process"]
    mode = describe_mode(args.quick, reps, duration_s)
    hidden = cfg.policy.kwargs.get("hidden_sizes")
    print(f"\nlearner feed: DQN updates/s, batch {t.batch_size}, hidden {hidden}, 1 torch thread, {prefill:,} transitions; {mode}")
    print_table(["batches from", "updates/s"], [["buffer service (gRPC)", r["grpc"]], ["in-process replay table", r["in_process"]]])
    print()
    met = verdict("grpc / in-process", ratio, TARGET)
    emit_json("learner_feed", args.quick, updates_per_s=r, ratio=ratio, target=TARGET, met=met)


if __name__ == "__main__":
    main()
