"""The house rules on imports, read from the source of every module.

- Imports run one way: `nsa_jax -> pallas_kernels`. The kernels and the NSA specification they
  are checked against (`pallas_kernels.reference`) never import `nsa_jax`, so the bottom floor
  can be used, tested and reasoned about alone.
- No private name crosses a module boundary: what one module uses from another is public
  (`from m import _x`, `m._x`, and a `_module` imported from outside its own package all count).
- Torch is a test-only dependency: nothing the package installs imports it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("nsa_jax", "pallas_kernels")
SCANNED = (*PACKAGES, "tests", "experiments")


def modules(root: pathlib.Path, *dirs: str) -> list[pathlib.Path]:
    return sorted(p for d in dirs for p in (root / d).rglob("*.py"))


def local_names(root: pathlib.Path) -> set[str]:
    """Top-level import names that resolve to this repository: the packages and test helpers."""
    names = {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    for d in ("tests", "experiments"):
        names |= {p.stem for p in (root / d).rglob("*.py")}
    return names


def imports(tree: ast.AST) -> list[tuple[int, str, list[ast.alias]]]:
    """`(line, module, names)` of every absolute import, those inside functions included;
    `names` is empty for `import module`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module, node.names))
    return out


def violations(root: pathlib.Path, dirs: tuple[str, ...]) -> dict[str, list[str]]:
    """Every breach of the three rules under `root / dirs`, as `path:line ...` strings."""
    local = local_names(root)
    found: dict[str, list[str]] = {"one_way": [], "private": [], "torch": []}
    for path in modules(root, *dirs):
        rel = path.relative_to(root)
        tree = ast.parse(path.read_text(), str(path))
        bound: set[str] = set()  # names this file binds to local modules
        for line, mod, names in imports(tree):
            top = mod.split(".")[0]
            where = f"{rel}:{line}"
            if rel.parts[0] == "pallas_kernels" and top == "nsa_jax":
                found["one_way"].append(f"{where} imports {mod}")
            if top == "torch" and rel.parts[0] in PACKAGES:
                found["torch"].append(f"{where} imports {mod}")
            if top not in local:
                continue
            bound |= {a.asname or a.name for a in names} if names else {top}
            own = rel.parts[0] == top  # a package may use its own private modules
            if not own and any(x.startswith("_") for x in mod.split(".")[1:]):
                found["private"].append(f"{where} imports the private module {mod}")
            for a in names:
                is_module = (root.joinpath(*mod.split("."), f"{a.name}.py")).exists()
                if a.name.startswith("_") and not (own and is_module):
                    found["private"].append(f"{where} imports {mod}.{a.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found["private"].append(f"{rel}:{node.lineno} uses {node.value.id}.{node.attr}")
    return {rule: sorted(set(found[rule])) for rule in found}


@pytest.fixture(scope="module")
def repo_violations() -> dict[str, list[str]]:
    return violations(ROOT, SCANNED)


def test_pallas_kernels_never_imports_nsa_jax(repo_violations):
    bad = repo_violations["one_way"]
    assert not bad, "imports run nsa_jax -> pallas_kernels only:\n" + "\n".join(bad)


def test_no_private_name_is_imported_across_modules(repo_violations):
    bad = repo_violations["private"]
    assert not bad, "private names stay in their module:\n" + "\n".join(bad)


def test_installed_packages_do_not_import_torch(repo_violations):
    bad = repo_violations["torch"]
    assert not bad, "torch is for tests only:\n" + "\n".join(bad)


def test_each_rule_catches_what_it_forbids(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "pallas_kernels" / "kernel.py").write_text(
        "def f():\n"
        "    from nsa_jax.attention import nsa\n"  # a lazy import still counts
        "    return nsa\n"
    )
    (tmp_path / "nsa_jax" / "model.py").write_text(
        "import torch\n"
        "from pallas_kernels import _compat\n"
        "from pallas_kernels.reference.segments import _hidden, public\n"
        "from pallas_kernels.reference import chunks as ch\n"
        "x = ch._pad(public) + ch.public + ch.__name__\n"
    )
    (tmp_path / "pallas_kernels" / "_compat.py").write_text("")
    (tmp_path / "pallas_kernels" / "ok.py").write_text("from pallas_kernels import _compat\n")
    found = violations(tmp_path, PACKAGES)
    assert found["one_way"] == ["pallas_kernels/kernel.py:2 imports nsa_jax.attention"]
    assert found["torch"] == ["nsa_jax/model.py:1 imports torch"]
    assert sorted(found["private"]) == [
        "nsa_jax/model.py:2 imports pallas_kernels._compat",
        "nsa_jax/model.py:3 imports pallas_kernels.reference.segments._hidden",
        "nsa_jax/model.py:5 uses ch._pad",
    ]
