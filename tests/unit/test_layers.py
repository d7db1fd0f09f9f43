"""Layer direction: `lint-imports` checks pyproject.toml's [tool.importlinter] contracts.

config <- model <- fp8, parallel, checkpoint <- train | inference <- rl <- serving <- cli; the shared
utilities (tokenizer, runtime, io) import no other part of dsv3; plan imports config only. Imports inside
functions count: a lazy import is still a dependency. (model never importing torch.distributed is
checked by test_imports.py.)
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_contracts_are_declared():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["root_package"] == "dsv3"
    contracts = config["contracts"]
    assert any(c["type"] == "layers" and "dsv3.train | dsv3.inference" in c["layers"] for c in contracts)
    assert not any(c.get("ignore_imports") for c in contracts), "fix the import instead of ignoring it"


def test_import_layers():
    """Every contract is kept; on failure the message names each offending import with its line."""
    lint_imports = Path(sys.executable).parent / "lint-imports"  # installed by the dev extra
    assert lint_imports.is_file(), f"{lint_imports} missing: pip install -e '.[dev]' (make install)"
    proc = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"import contracts broken:\n{proc.stdout}\n{proc.stderr}"
