"""Dependencies run one way: the framework reaches models/ and trainers/ only by name (titan_rl.registry),
the rollout and trainer packages do not import each other, and clients depend only on protos and the codec."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "titan_rl"


def imported_modules(path: Path) -> set[str]:
    """Every module (or `module.name`) a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def framework_files(sub: str = "") -> list[Path]:
    return [p for p in sorted((PACKAGE / sub).rglob("*.py")) if "v1" not in p.relative_to(PACKAGE).parts]


@pytest.mark.parametrize("path", framework_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_the_framework_never_imports_trainers_or_models(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ("trainers", "models")}
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: reach them through titan_rl.registry by name"


@pytest.mark.parametrize(("package", "forbidden"), [("rollout", "titan_rl.trainer"), ("trainer", "titan_rl.rollout")])
def test_rollout_and_trainer_do_not_import_each_other(package, forbidden):
    for path in framework_files(package):
        bad = {m for m in imported_modules(path) if m == forbidden or m.startswith(forbidden + ".")}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("path", framework_files("clients"), ids=lambda p: p.name)
def test_clients_depend_only_on_the_protos_the_codec_and_rpc(path):
    allowed = ("titan_rl.v1", "titan_rl.wire", "titan_rl.rpc", "titan_rl.errors", "titan_rl.records")
    ours = {m for m in imported_modules(path) if m.startswith("titan_rl")}
    bad = {m for m in ours if not m.startswith(allowed)}
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"
