"""`python -m titan_rl.buffer --config FILE [--host H] [--port P] [KEY=VALUE ...]`: run the buffer service.

The options are read before anything imports torch, so that `--help` and a mistyped option answer
at once (checking the config then imports its algorithm, and torch with it); the service itself is
`titan_rl.buffer.process`.
"""

from __future__ import annotations

from titan_rl.scratch import run_scratch_dir
from titan_rl.service import parse_service_args


def main(argv: list[str] | None = None) -> None:
    cfg = parse_service_args("buffer", "buffer_server", argv=argv)
    with run_scratch_dir():  # before torch's import, which makes its compiler's cache folder
        from titan_rl.buffer.process import run_service  # torch: only once the options are good

        run_service(cfg)


if __name__ == "__main__":
    main()
