"""Import hygiene: every dsv3 module imports, and the model code never touches torch.distributed.

`import torch` itself loads parts of torch.distributed, so the runtime check compares the
torch.distributed modules loaded before and after importing dsv3.model; the source check catches
any `import torch.distributed`, `from torch import distributed` or `torch.distributed.x` use.
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import dsv3

MODEL_DIR = Path(dsv3.__file__).parent / "model"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _declared_dependencies() -> set[str]:
    """Top-level names of the packages pyproject.toml requires (core and extras)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace("-", "_") for r in reqs}


def test_every_module_imports():
    """Every module imports; only hardware-specific packages that pyproject does not require (triton on a
    CPU machine) may be missing, and then only for the modules that need them."""
    names = [
        m.name
        for m in pkgutil.walk_packages(dsv3.__path__, prefix="dsv3.")
        if not m.name.endswith("__main__")
    ]
    assert "dsv3.model.transformer" in names and "dsv3.checkpoint.hf" in names
    declared = _declared_dependencies()
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top == "dsv3" or top.lower() in declared:
                raise
    assert callable(dsv3.from_pretrained)


def _distributed_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.startswith("torch.distributed") or (
                mod == "torch" and any(a.name == "distributed" for a in node.names)
            ):
                found.append(mod)
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            value = node.value
            found += ["torch.distributed"] if isinstance(value, ast.Name) and value.id == "torch" else []
    return found


def test_source_scan_detects_and_model_is_clean():
    assert _distributed_uses("import torch.distributed as dist") == ["torch.distributed"]
    assert _distributed_uses("from torch import distributed") == ["torch"]
    assert _distributed_uses("import torch\ntorch.distributed.barrier()") == ["torch.distributed"]
    files = sorted(MODEL_DIR.rglob("*.py"))
    assert len(files) >= 5
    for f in files:
        assert _distributed_uses(f.read_text()) == [], f"{f} uses torch.distributed"


def test_importing_the_model_loads_no_distributed_module():
    code = (
        "import sys, json, torch\n"
        "before = {m for m in sys.modules if m.startswith('torch.distributed')}\n"
        "import pkgutil, importlib, dsv3.model\n"
        "for m in pkgutil.walk_packages(dsv3.model.__path__, prefix='dsv3.model.'):\n"
        "    importlib.import_module(m.name)\n"
        "after = {m for m in sys.modules if m.startswith('torch.distributed')}\n"
        "print(json.dumps(sorted(after - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
