"""`titan-rl COMMAND [options]`: the console script pip installs (see pyproject.toml).

Each command is the module that also runs on its own, with the same options:
`titan-rl run` is `bash run.sh` without the set-up, `titan-rl buffer` is `python -m titan_rl.buffer`,
`titan-rl visualize` is `python visualize.py`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": ("titan_rl.launch", "train on this machine: buffer, trainer and rollout as three processes"),
    "buffer": ("titan_rl.buffer.__main__", "serve the experience buffer"),
    "rollout": ("titan_rl.rollout.__main__", "serve the actors: worker processes stepping envs"),
    "trainer": ("titan_rl.trainer.__main__", "serve the learner until its budget is met"),
    "learner": ("titan_rl.trainer.learner", "a learner rank on a host of its own, joining the trainer's group"),
    "visualize": ("titan_rl.visualize", "watch, record or score a checkpoint's greedy agent"),
    "plot": ("titan_rl.plot", "draw learning curves of run folders to a PNG"),
}


def usage() -> str:
    lines = ["usage: titan-rl COMMAND [options]   (titan-rl COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<10} {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"titan-rl: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
