"""The import rules of docs/ARCHITECTURE.md: the edge and the cloud run on different machines,
so ``edge_agent`` and ``cloud_worker`` never import each other, ``shared`` imports neither, and
only ``shared/mqtt.py`` imports paho."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


FORBIDDEN = {
    "shared": ("edge_agent", "cloud_worker", "bench", "tests"),
    "edge_agent": ("cloud_worker", "bench", "tests"),
    "cloud_worker": ("edge_agent", "bench", "tests"),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_do_not_import_across_the_network(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_modules(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_only_the_mqtt_module_imports_paho() -> None:
    users = sorted(
        str(path.relative_to(ROOT))
        for package in ("shared", "edge_agent", "cloud_worker", "bench")
        for path in (ROOT / package).rglob("*.py")
        if any(name.split(".")[0] == "paho" for name in imported_modules(path))
    )
    assert users == ["shared/mqtt.py"]
