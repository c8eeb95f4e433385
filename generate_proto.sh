#!/usr/bin/env bash
# Generate the titan_rl.v1 Python modules (and .pyi stubs) from proto/.
# Output lands in titan_rl/v1/, which git ignores: never edit it by hand.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
out=titan_rl/v1
mkdir -p "$out"
"$PYTHON" -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. proto/titan_rl/v1/*.proto
touch "$out/__init__.py"
echo "generated $(ls "$out"/*_pb2*.py | wc -l) modules in $out"
