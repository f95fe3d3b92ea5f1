"""Nothing in the tree can unpickle: no pickle/dill/joblib/marshal loads, torch.load only with
weights_only=True, yaml.load only with a safe loader, numpy.load never with allow_pickle.

The check reads each file's syntax tree and resolves import aliases (`import pickle as p`,
`from torch import load`), so a pattern inside a string or comment (like the examples in this
file) is not a call and cannot trigger it, while a renamed import cannot hide one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", "site-packages", "dist-packages", ".venv", "venv", "node_modules",
             "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".tox", "build",
             "dist", ".eggs"}

# Calls that unpickle (or execute) whatever bytes they are given, whatever their arguments.
ALWAYS_UNSAFE = {
    f"{mod}.{fn}"
    for mod in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle")
    for fn in ("load", "loads", "Unpickler")
} | {"joblib.load", "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle",
     "numpy.lib.format.read_array", "yaml.unsafe_load", "yaml.unsafe_load_all",
     "yaml.full_load", "yaml.full_load_all", "torch.serialization._legacy_load"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> fully qualified name, from every import in the module."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    root = a.name.split(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _qualified(func: ast.expr, aliases: dict[str, str]) -> str | None:
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    base = aliases.get(func.id, func.id)
    return ".".join([base, *reversed(parts)])


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def violations(source: str, filename: str = "<string>") -> list[str]:
    """Every unpickling call in `source`, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _qualified(node.func, aliases)
        if name is None:
            continue
        name = name.replace("np.", "numpy.", 1) if name.startswith("np.") else name
        problem = None
        if name in ALWAYS_UNSAFE:
            problem = f"{name}() unpickles or executes its input"
        elif name in ("torch.load", "torch.serialization.load"):
            if not _is_const(_keyword(node, "weights_only"), True):
                problem = "torch.load without weights_only=True"
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = _qualified(loader, aliases) if loader is not None else None
            if loader_name is None or loader_name.split(".")[-1] not in SAFE_YAML_LOADERS:
                problem = f"{name} without Loader=yaml.SafeLoader (use yaml.safe_load)"
        elif name in ("numpy.load", "numpy.lib.npyio.load"):
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not _is_const(allow, False):
                problem = "numpy.load with allow_pickle enabled"
        if problem:
            found.append(f"{filename}:{node.lineno}: {problem}")
    return found


def python_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py")
                  if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts))


def test_the_tree_never_unpickles() -> None:
    files = python_files()
    assert Path(__file__).resolve() in files  # this file is scanned too
    assert len(files) > 20
    bad = [v for p in files
           for v in violations(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not bad, "unpickling calls found:\n" + "\n".join(bad)


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.loads(data)",
    "import pickle as p\np.load(f)",
    "from pickle import loads as l\nl(data)",
    "import pickle\npickle.Unpickler(f).load()",
    "import dill\ndill.loads(b)",
    "import joblib\njoblib.load('m.pkl')",
    "import torch\ntorch.load('m.pt')",
    "import torch\ntorch.load('m.pt', weights_only=False)",
    "import torch\ntorch.load('m.pt', weights_only=flag)",
    "from torch import load\nload('m.pt')",
    "import torch as t\nt.load(buf, map_location='cpu')",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.load(text, yaml.FullLoader)",
    "import yaml\nyaml.unsafe_load(text)",
    "import yaml\nyaml.full_load(text)",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "import numpy\nnumpy.load('a.npz', allow_pickle=flag)",
    "import marshal\nmarshal.loads(code)",
    "import pandas as pd\npd.read_pickle('x')",
])
def test_the_checker_catches_each_way_to_unpickle(snippet: str) -> None:
    assert violations(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('m.pt', weights_only=True)",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import yaml\nyaml.load(text, yaml.CSafeLoader)",
    "import numpy as np\nnp.load('a.npz', allow_pickle=False)",
    "import numpy as np\nnp.load('a.npy')",
    "import pickle\npickle.dumps(obj)",
    "x = 'pickle.loads(data)'  # torch.load(f)",
    "from safetensors.torch import load\nload(data)",
    "import json\njson.loads(text)",
])
def test_the_checker_allows_safe_calls_and_ignores_strings(snippet: str) -> None:
    assert not violations(snippet), snippet
