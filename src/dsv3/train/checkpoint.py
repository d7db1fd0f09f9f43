"""Native training checkpoints: atomic, checksummed, the last N kept.

Layout: RUN_DIR/checkpoints/step_NNNNNNNN (8-digit step)/ with
  model.safetensors   every parameter and buffer (the balance biases included)
  train_state.pt      optimizer, schedule position, data position, RNG states, configs
  manifest.json       format, step, and each file's byte size and SHA-256; written last

Atomicity: everything goes to a temporary directory next to the final one; every file is fsynced,
then the directory is renamed into place and the parent fsynced. A crash leaves either the previous
state or a `.tmp-*` directory that the next save removes; never a half-written step_* directory.
A step_* directory can still be damaged later (truncated copy, bit rot): loading verifies every file
against the manifest and, if the newest checkpoint fails, says which one and why and falls back to the
previous good one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT = "dsv3-native-v1"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files, truncated or fails its checksum."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """step_* directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def _fsync_dir(path: Path) -> None:
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


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _model_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, shared storage split (safetensors refuses aliases, e.g. tied weights)."""
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[k] = t.clone() if key in seen else t
        seen.add(key)
    return out


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write step_{step} atomically under root, then delete all but the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    try:
        files = {MODEL_FILE: _write_file(tmp / MODEL_FILE, save_safetensors(_model_tensors(model_state)))}
        buf = io.BytesIO()
        torch.save(train_state, buf)
        files[STATE_FILE] = _write_file(tmp / STATE_FILE, buf.getvalue())
        manifest = {"format": FORMAT, "step": step, "files": files}
        _write_file(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (a resumed run stopping where it started): replace it
            old = root / f".tmp-old-{step_dir_name(step)}-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint against its manifest; return the manifest or raise CheckpointError (why)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: {MANIFEST} is unreadable") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r}")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"{path}: {name} is truncated or padded ({size} bytes, expected {meta['bytes']})"
            )
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != meta["sha256"]:
            raise CheckpointError(f"{path}: {name} fails its SHA-256 checksum (corrupted)")
    return manifest


def latest_good_checkpoint(root: str | Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint under root that verifies; each bad newer one is named through `warn`."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {e}; falling back to the previous one")
    return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and read a checkpoint: (model state dict, train state)."""
    path = Path(path)
    verify_checkpoint(path)
    model_state = load_safetensors((path / MODEL_FILE).read_bytes())
    train_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return model_state, train_state
