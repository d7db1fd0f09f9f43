"""Native training checkpoints: one format for one process, expert/data-parallel and pipeline runs.

Layout: RUN_DIR/checkpoints/step_NNNNNNNN (8-digit step)/ holding, for each rank r of the run,
  model-rank0000r.safetensors  that rank's model state: every parameter and buffer it holds (the whole
                               model in one process, its expert shard or its pipeline stages otherwise)
  state-rank0000r.pt           its train state: optimizer (its ZeRO-1 shard), schedule and data position,
                               RNG states, configs
  manifest.json                format, step, world size and layout, every file's size and SHA-256; last

Writing is a collective under a mesh and goes through dsv3.io's atomic writer: rank 0 makes
`.tmp-step_N`, every rank writes and fsyncs its two files there, the checksums are gathered, rank 0
writes the manifest and renames the directory into place. A crash or a dead rank leaves a `.tmp-*`
directory (the next save removes it), never a step_* one. An OSError on any rank (a full disk) fails
the save on every rank with one line naming the path; the previous checkpoints stay as they were.

Reading: `latest_good_checkpoint` walks step_* newest first; one whose manifest or any of this rank's
files is missing, truncated or fails its checksum is named (through `warn`) and skipped, the ranks
agreeing on the choice; a checkpoint written with another world size or layout is an error (resume with
the same layout).

Why not torch.distributed.checkpoint: it re-shards DTensor state on load, but the ZeRO-1 optimizer
shards here are plain per-rank state dicts (the same keys with different values on every rank), and it
has neither checksums nor an atomic commit of the step directory, which exact resume relies on.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dsv3 import io as dio
from dsv3.parallel.mesh import Mesh

FORMAT = "dsv3-native-v2"
MANIFEST = "manifest.json"
LAYOUT_KEYS = ("pp", "dp", "ep", "nodes")


class CheckpointError(dio.CorruptFile):
    """A checkpoint directory that is incomplete, truncated or fails its checksum."""


def model_file(rank: int = 0) -> str:
    return f"model-rank{rank:05d}.safetensors"


def state_file(rank: int = 0) -> str:
    return f"state-rank{rank:05d}.pt"


MODEL_FILE, STATE_FILE = model_file(0), state_file(0)  # a one-process run's two files


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """step_* directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


# --------------------------------------------------------------------------- collectives (no-ops alone)
def _mesh(mesh: Mesh | None) -> Mesh:
    return mesh if mesh is not None else Mesh.single()


def _gather(obj: Any, mesh: Mesh) -> list[Any]:
    if mesh.world_size == 1:
        return [obj]
    out: list[Any] = [None] * mesh.world_size
    dist.all_gather_object(out, obj, group=mesh.world_group)
    return out


def _from_rank0(obj: Any, mesh: Mesh) -> Any:
    if mesh.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=mesh.world_group)
    return box[0]


def _layout(mesh: Mesh) -> dict[str, int]:
    return {"world_size": mesh.world_size, **{k: getattr(mesh.config, k) for k in LAYOUT_KEYS}}


# --------------------------------------------------------------------------- writing
def _model_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, shared storage split (safetensors refuses aliases, e.g. tied weights)."""
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[k] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _failed(final: Path, reason: str) -> dio.WriteError:
    kept = [p.name for p in list_checkpoints(final.parent) if p != final]
    intact = (
        f"the previous checkpoints are intact (newest: {kept[-1]})" if kept else "none was written before"
    )
    return dio.WriteError(f"cannot write checkpoint {final}: {reason}; {intact}")


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    *,
    mesh: Mesh | None = None,
    keep: int = 3,
) -> Path:
    """Collective: write this rank's states into step_{step} under root; the directory appears once every
    rank's files are on disk. Then all but the newest `keep` checkpoints are deleted (keep=0: none)."""
    mesh = _mesh(mesh)
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    err = None
    if mesh.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            dio.make_temp_dir(final, tmp.name)
        except (OSError, dio.WriteError) as e:
            err = getattr(e, "strerror", None) or str(e)
    err = _from_rank0(err, mesh)
    if err:
        raise _failed(final, err)
    files: dict[str, dict[str, Any]] = {}
    try:
        blob = save_safetensors(_model_tensors(model_state))
        files[model_file(mesh.rank)] = dio.write_synced(tmp / model_file(mesh.rank), blob)
        buf = io.BytesIO()
        torch.save(train_state, buf)
        files[state_file(mesh.rank)] = dio.write_synced(tmp / state_file(mesh.rank), buf.getvalue())
    except OSError as e:
        err = e.strerror or str(e)
    results = _gather((files, err), mesh)
    errors = [e for _, e in results if e]
    if not errors and mesh.rank == 0:
        try:
            manifest = {"format": FORMAT, "step": step, "layout": _layout(mesh), "files": {}}
            for f, _ in results:
                manifest["files"].update(f)
            dio.write_synced(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
            dio.commit_dir(tmp, final)
            for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        except (OSError, dio.WriteError) as e:
            err = getattr(e, "strerror", None) or str(e)
    if (errors or err) and mesh.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    err = _from_rank0(errors[0] if errors else err, mesh)
    if err:
        raise _failed(final, err)
    return final


# --------------------------------------------------------------------------- reading
def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
        manifest["files"], manifest["layout"]  # noqa: B018 - both must be there
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: {MANIFEST} is unreadable") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r}")
    return manifest


def verify_checkpoint(path: str | Path, mesh: Mesh | None = None) -> dict[str, Any]:
    """Check a checkpoint against its manifest (with a mesh: its layout and that rank's files; without:
    every file); return the manifest. CheckpointError says why it is unusable, ValueError if it was
    written with another layout."""
    path = Path(path)
    manifest = read_manifest(path)
    files = manifest["files"]
    if mesh is not None:
        if manifest["layout"] != _layout(mesh):
            raise ValueError(
                f"checkpoint {path} was written with layout {manifest['layout']}; this run has "
                f"{_layout(mesh)} (resume with the same layout)"
            )
        mine = (model_file(mesh.rank), state_file(mesh.rank))
        files = {n: files.get(n, {"bytes": -1, "sha256": ""}) for n in mine}
    try:
        dio.verify_files(path, files)
    except dio.CorruptFile as e:
        raise CheckpointError(str(e)) from None
    return manifest


def latest_good_checkpoint(
    root: str | Path, mesh: Mesh | None = None, warn: Callable[[str], None] = print
) -> Path | None:
    """Collective: the newest checkpoint under root that verifies on every rank; each newer bad one is
    named through `warn`."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path, mesh)
            reason = None
        except CheckpointError as e:
            reason = str(e)
        reasons = [r for r in _gather(reason, _mesh(mesh)) if r]
        if not reasons:
            return path
        warn(f"warning: skipping checkpoint {reasons[0]}; falling back to the previous one")
    return None


def load_checkpoint(
    path: str | Path, mesh: Mesh | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and read this rank's part of a checkpoint: (model state dict, train state)."""
    path = Path(path)
    verify_checkpoint(path, _mesh(mesh))
    rank = _mesh(mesh).rank
    model_state = load_safetensors((path / model_file(rank)).read_bytes())
    train_state = torch.load(path / state_file(rank), map_location="cpu", weights_only=True)
    return model_state, train_state


@dataclass
class Checkpointer:
    """A run's checkpoint directory: where to save, how many to keep, over which ranks."""

    root: Path
    keep: int = 3
    mesh: Mesh | None = None
    warn: Callable[[str], None] = field(default=print)

    def list(self) -> list[Path]:
        return list_checkpoints(self.root)

    def save(self, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any]) -> Path:
        return save_checkpoint(self.root, step, model_state, train_state, mesh=self.mesh, keep=self.keep)

    def latest(self) -> Path | None:
        return latest_good_checkpoint(self.root, self.mesh, warn=self.warn)

    def load(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return load_checkpoint(path, self.mesh)
