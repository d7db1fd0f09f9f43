"""Loads this directory's JSONL files for the YAML tasks beside it (lm-eval `custom_dataset`).

`data_files` in a task's `dataset_kwargs` is relative to this directory, so the tasks run from any working
directory; `datasets`' packaged json builder reads them without any download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def local_json(data_files: str, **_metadata: Any) -> Any:
    """A DatasetDict with one `test` split read from HERE/data_files (extra metadata kwargs ignored)."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(HERE / data_files)})
