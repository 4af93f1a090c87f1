"""The installed package declares what it imports: `pip install -e .` alone (the README's first
command, without the dev extra) must give every third-party module that `nsa_jax` and
`pallas_kernels` import, at module level or inside a function.

(The Qwen tokenizer package once sat in the dev extra only: the tests passed, and `nsa-jax
demo` on a fresh machine failed at its first training.)
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nsa_jax", "pallas_kernels")


def imported_modules() -> dict[str, list[str]]:
    """Top-level names of the absolute imports in the packages' sources -> the files."""
    found: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], []).append(
                        str(path.relative_to(ROOT)))
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_runtime() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonical(re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0])
            for d in project["dependencies"]}


def test_every_imported_distribution_is_a_runtime_dependency() -> None:
    declared = declared_runtime()
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in imported_modules().items():
        if module in sys.stdlib_module_names or module in PACKAGES:
            continue
        owners = {canonical(d) for d in dists.get(module, [])}
        assert owners, f"module {module!r} (imported in {files[0]}) is not installed"
        if not owners & declared:
            missing[module] = (sorted(owners), files[0])
    assert not missing, (
        "imported but not in pyproject.toml's [project] dependencies (a fresh `pip install "
        f"-e .` lacks them): {missing}")


def test_every_runtime_dependency_is_imported() -> None:
    dists = importlib.metadata.packages_distributions()
    used = {canonical(d) for m in imported_modules() for d in dists.get(m, [])}
    unused = sorted(declared_runtime() - used)
    assert not unused, f"declared in pyproject.toml but imported nowhere: {unused}"
