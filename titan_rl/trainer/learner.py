"""`python -m titan_rl.trainer.learner --config shared.yaml --rank 1`: a learner rank on a host of its own.

`train.learner_group_address` names where the trainer (rank 0) listens. A rank started before the
trainer waits for it (up to GROUP_TIMEOUT_S); it exits 0 when the run ends, and non-zero when the
group ends while the run goes on (the trainer stopped by a signal, or a rank gone), so that whatever
supervises it starts it again for the next trainer. The rank itself is `titan_rl.trainer.ranks`;
the options are read before anything imports torch, so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from titan_rl.scratch import run_scratch_dir
from titan_rl.service import load_service_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m titan_rl.trainer.learner", description="Run one learner rank on this host, joining the trainer's group."
    )
    parser.add_argument("--config", default="config/cartpole.yaml", help="the run's YAML config (the trainer's)")
    parser.add_argument("--rank", type=int, required=True, help="this learner's rank, 1 .. train.learners-1 (the trainer is 0)")
    parser.add_argument("--local-rank", type=int, default=0, help="which of this host's learners it is, and so its GPU (default 0)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as the trainer's")
    args = parser.parse_intermixed_args(argv)
    cfg = load_service_config(args.config, args.overrides, "trainer")  # a rank of the trainer
    t = cfg.train
    if not t.learner_group_address:
        sys.exit(f"error: {args.config}: train.learner_group_address is empty: a learner on a host of its own dials the trainer there")
    if not 1 <= args.rank < t.learners:
        sys.exit(f"error: --rank {args.rank}: must be in 1..{t.learners - 1} (train.learners={t.learners}; the trainer is rank 0)")
    with run_scratch_dir():  # before torch's import, which makes its compiler's cache folder
        from titan_rl.trainer.ranks import run_remote_rank  # torch: only once the options are good

        run_remote_rank(cfg, args.rank, args.local_rank)


if __name__ == "__main__":
    main()
