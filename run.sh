#!/usr/bin/env bash
# TITAN-RL entry point.
#   bash run.sh [--config FILE] [--seed N] [section.key=value ...]   train (default: config/cartpole.yaml)
#   bash run.sh --resume [--config FILE] [section.key=value ...]      continue the run of the last checkpoint_last.pth
#   bash run.sh test [pytest args ...]                                the test suite after a lint and format check; with args, those tests only
# Sets itself up on first use: .venv with the project installed in it (pip install -e .[test], which
# also gives the `titan-rl` command), protobuf code from proto/.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: TITAN-RL needs Python >= 3.10 as '$PYTHON' (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.installed" ] \
  || [ -n "$(find requirements.txt pyproject.toml setup.py -newer "$VENV/.installed")" ]; then
  echo "setting up $VENV (first run: a few minutes)..."
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
  touch "$VENV/.installed"
fi

stamp=titan_rl/v1/common_pb2.py
if [ ! -f "$stamp" ] || [ -n "$(find proto generate_proto.sh -newer "$stamp" 2>/dev/null)" ]; then
  PYTHON="$VENV/bin/python" bash generate_proto.sh
fi

if [ "${1:-}" = test ]; then
  shift
  if [ $# -eq 0 ]; then  # the whole suite, as CI runs it; a chosen file or -k runs its tests only
    "$VENV/bin/python" -m ruff check .
    "$VENV/bin/python" -m ruff format --check .
  fi
  exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/python" -m titan_rl.launch "$@"
