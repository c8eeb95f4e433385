"""Generates titan_rl/v1 from proto/ (generate_proto.sh) before setuptools looks for packages, so
that every build and install, editable or not, holds the protobuf modules the services import.
Everything else about the package is in pyproject.toml."""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup

root = Path(__file__).resolve().parent
subprocess.run(["bash", str(root / "generate_proto.sh")], check=True, env={**os.environ, "PYTHON": sys.executable})
setup()
