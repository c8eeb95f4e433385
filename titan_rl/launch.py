"""`bash run.sh [--config FILE] [--seed N] [section.key=value ...]` ends up here: train on this machine
with buffer, trainer and rollout as three processes (`titan_rl.launcher`).

The services' forkserver (`titan_rl.preload`) starts before anything else is imported: its imports
of torch are the longest step from launch to the first update, and the launcher's own imports and
config check run beside them on the other core.
"""

from __future__ import annotations

import argparse
import sys

from titan_rl.errors import TitanError
from titan_rl.preload import start_preloading, stop_preloading
from titan_rl.scratch import run_scratch_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="titan-rl run", description="Train with buffer, trainer and rollout services on this machine.")
    parser.add_argument("--config", default="config/cartpole.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="overrides seed")
    parser.add_argument("--resume", action="store_true", help="continue the run of the last checkpoint: learner, counters, replay")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. algorithm.config.lr=0.0005 budget.max_env_steps=50000"
    )
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
    with run_scratch_dir():  # before the forkserver starts: every service inherits it
        start_preloading()
        from titan_rl.launcher import Launcher  # after the forkserver has started: see the module's docstring

        try:
            launcher = Launcher(args.config, overrides, resume=args.resume)
        except BaseException as e:
            stop_preloading()
            if not isinstance(e, TitanError):
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2
        return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
