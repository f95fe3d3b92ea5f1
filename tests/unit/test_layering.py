"""The tree's rules: components meet only in the core; `operator/` never shadows the stdlib."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = {"operator": "deeprad.operator", "trainer": "deeprad.trainer",
              "aggregator": "deeprad.aggregator"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_components_do_not_import_each_other() -> None:
    for folder, own in COMPONENTS.items():
        others = [m for m in COMPONENTS.values() if m != own]
        for path in (ROOT / folder).rglob("*.py"):
            bad = [i for i in _imports(path) if any(i == o or i.startswith(o + ".")
                                                     for o in others)]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_core_imports_no_component() -> None:
    for path in (ROOT / "deeprad" / "core").rglob("*.py"):
        bad = [i for i in _imports(path)
               if any(i.startswith(m) for m in (*COMPONENTS.values(), "deeprad.simulate",
                                                  "deeprad.cli", "deeprad.devenv"))]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_operator_folder_does_not_shadow_the_standard_library() -> None:
    code = "import operator, deeprad.operator; print(operator.__file__, deeprad.operator.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    assert "site-packages" not in out[0] and not out[0].startswith(str(ROOT / "operator"))
    assert out[1].startswith(str(ROOT / "operator"))


def test_every_package_is_in_the_distribution() -> None:
    """A wheel (the images install one) holds only the packages pyproject lists."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = {name: ROOT / path for name, path in config["package-dir"].items()}
    found = set()
    for name, base in dirs.items():
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name, *rel)))
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {found - listed}"
