"""Durable files: the one atomic writer behind native checkpoints and HF exports, and the dtype names.

A write is visible under its final name only once complete: data goes to a temporary sibling (a file or a
directory), every file is fsynced, the temporary is renamed into place and the parent directory fsynced,
so a crash leaves the previous version or a `.tmp-*` leftover, never a half-written file. Checkpoints list
each file's byte size and SHA-256 in a manifest (`verify_files` checks them), which catches what the
rename cannot: a later truncated copy or bit rot.

An OSError while writing (a full disk, a read-only mount) becomes one `WriteError` line naming the path,
after the temporary is removed; whatever was at the final path before is untouched. New files and
directories get the permissions the umask allows (0o666 / 0o777 & ~umask), as `open` would give them,
not the private 0o600 / 0o700 of `mkstemp` / `mkdtemp`.

Only the standard library and torch (for the dtype map) are imported here: every layer may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# the one map from dtype names (configs, CLI flags) to torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def torch_dtype(name: str, allowed: tuple[str, ...] | None = None) -> torch.dtype:
    """The torch dtype called `name` (ValueError listing the choices for an unknown one)."""
    choices = allowed or tuple(DTYPES)
    if name not in choices or name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(choices)}, got {name!r}")
    return DTYPES[name]


class WriteError(ValueError):
    """An OSError while writing `path`, as one line; the temporary was removed, the old version kept."""


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """Permissions of a new file under the process umask (what `open(path, "w")` gives)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_synced(path: str | os.PathLike, data: bytes) -> dict[str, Any]:
    """Write `data` to a new file (inside a temporary directory) and fsync it: its manifest entry."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def atomic_write(path: str | os.PathLike, data: bytes) -> dict[str, Any]:
    """Replace the file at `path` by `data` atomically; its manifest entry. WriteError on an OSError."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, file_mode())
        entry = write_synced(tmp, data)
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
        return entry
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def make_temp_dir(final: str | os.PathLike, name: str | None = None) -> Path:
    """A fresh temporary sibling of `final` (named `name`, else a unique `.tmp-<final>-*`)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if name is None:
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        else:
            tmp = final.parent / name
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        tmp.chmod(dir_mode())
        return tmp
    except OSError as e:
        raise WriteError(f"cannot write {final}: {e.strerror or e}") from e


def commit_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Give every file of `tmp` the umask's permissions and fsync it, then rename `tmp` to `final`
    (replacing an existing one) and fsync the parent. On an OSError `tmp` is removed and `final` is left
    as it was (WriteError)."""
    tmp, final = Path(tmp), Path(final)
    mode = file_mode()
    try:
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(mode)  # some writers (safetensors' save_file) create their files private
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():  # move the old version aside first: a crash in between keeps one of them
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
        return final
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"cannot write {final}: {e.strerror or e}") from e


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes `final` (see `commit_dir`). Any error removes
    it; an OSError inside the block is re-raised as a WriteError naming `final`."""
    tmp = make_temp_dir(final)
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"cannot write {final}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final)


class CorruptFile(ValueError):
    """A file missing, truncated or failing its checksum against a manifest."""


def verify_files(root: str | os.PathLike, files: dict[str, dict[str, Any]]) -> None:
    """Check each `root/name` against its manifest entry {"bytes", "sha256"}; CorruptFile says why."""
    root = Path(root)
    for name, meta in files.items():
        f = root / name
        if not f.is_file():
            raise CorruptFile(f"{root}: {name} is missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CorruptFile(
                f"{root}: {name} is truncated or padded ({size} bytes, expected {meta['bytes']})"
            )
        if sha256_file(f) != meta["sha256"]:
            raise CorruptFile(f"{root}: {name} fails its SHA-256 checksum (corrupted)")


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; ValueError naming the file
    and line for a missing file or a line that is not JSON."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompts file not found: {path}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
    return out
