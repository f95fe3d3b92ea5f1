"""The tree's rules: four installable components and a shared core, each in its own folder with
its own pyproject.toml; components meet only in the core; nothing at the repository root shadows
the standard library; the operator never imports torch.

`make lint` checks the import rules statically with import-linter (`[tool.importlinter]` in the
root pyproject.toml); these tests check the same rules from the files and at run time."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from deeprad.core import __version__

ROOT = Path(__file__).resolve().parents[2]
# folder -> the one package its src/ holds
COMPONENTS = {"operator": "deeprad.operator", "trainer": "deeprad.trainer",
              "aggregator": "deeprad.aggregator"}
FRONT_ENDS = {"cli": ("deeprad.cli", "deeprad.simulate", "deeprad.inference"),
              "tools/devenv": ("deeprad.devenv",)}
PROJECTS = ["core", *COMPONENTS, *FRONT_ENDS]
HEAVY = ("torch", "monai", "opacus", "torchmetrics", "safetensors")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder / "src").rglob("*.py"))


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_components_do_not_import_each_other() -> None:
    for folder, own in COMPONENTS.items():
        others = [m for m in COMPONENTS.values() if m != own]
        others += [m for pkgs in FRONT_ENDS.values() for m in pkgs]
        for path in _sources(folder):
            bad = [i for i in _imports(path) if any(_is_under(i, o) for o in others)]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_core_imports_no_component() -> None:
    outside = [*COMPONENTS.values(), *(m for pkgs in FRONT_ENDS.values() for m in pkgs)]
    for path in _sources("core"):
        bad = [i for i in _imports(path) if any(_is_under(i, m) for m in outside)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("folder", PROJECTS)
def test_each_component_is_a_project_of_its_own(folder: str) -> None:
    """Own pyproject.toml at the shared version; `deeprad` stays a namespace package (an
    `__init__.py` there would hide every other component's part of it)."""
    project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
    src = ROOT / folder / "src"
    assert not (src / "deeprad" / "__init__.py").exists()
    expected = {"core": ("deeprad.core",), **COMPONENTS, **FRONT_ENDS}[folder]
    packages = (expected,) if isinstance(expected, str) else expected
    found = {f"deeprad.{p.name}" for p in (src / "deeprad").iterdir() if p.is_dir()
             and p.name != "__pycache__"}
    assert found == set(packages), f"{folder}/src/deeprad holds {sorted(found)}"


def test_operator_needs_no_torch() -> None:
    """The operator's dependency list (and the core's base list) names no ML package."""
    for folder in ("operator", "core"):
        deps = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"][
            "dependencies"]
        assert not [d for d in deps if d.split("[")[0].split(">")[0].split("=")[0] in HEAVY]
        assert not [d for d in deps if "[ml]" in d], f"{folder} pulls the core's [ml] extra"


def test_operator_never_imports_torch_at_run_time() -> None:
    """Every module of the operator imported in a fresh interpreter loads no ML package."""
    code = ("import pkgutil, sys, importlib, deeprad.operator as op\n"
            "for m in pkgutil.walk_packages(op.__path__, 'deeprad.operator.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            f"print(sorted(n for n in {HEAVY!r} if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]", f"the operator imported {out}"


@pytest.mark.parametrize("flags", [["-S"], []], ids=["no-site", "with-site"])
def test_nothing_at_the_root_shadows_the_standard_library(flags: list[str]) -> None:
    """From the repository root (on sys.path as ''), `operator` is still the stdlib's."""
    code = "import operator, collections, sys; print(operator.__file__)"
    out = subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert not out.startswith(str(ROOT)), f"`import operator` found {out}"
    shadows = [name for name in sys.stdlib_module_names
               if (ROOT / f"{name}.py").exists() or (ROOT / name / "__init__.py").exists()]
    assert not shadows, f"importable from the root and named like the stdlib: {shadows}"


def test_the_hub_operator_starts_without_numpy() -> None:
    """numpy alone is ~13 MiB of the hub's resident memory (bench-operator's goal is 250 MiB
    at 1000 sites): the hub's entry point and handlers load without it (the secure-aggregation
    protocol and the DP accountant load it when a round needs them)."""
    code = ("import sys, deeprad.operator.cli, deeprad.operator.hub, deeprad.operator.site.agent\n"
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "False", "the hub operator imported numpy at start"
