"""Distributed checkpoints (written completely or not at all) and full <-> sharded state dicts.

`save_sharded(path, state, mesh, meta)`: every rank writes its own state (model shard, optimizer shard,
RNG) into `path.partial/`, each file written to a temp name, fsynced and renamed; rank 0 gathers the
files' SHA-256s, writes manifest.json (world size, layout, checksums, meta) and only then renames the
directory to `path`. A rank that dies at any point leaves a `.partial` directory, never a `path`: the
barrier times out (process-group timeout) and the others raise. `latest_complete(dir)` ignores partial
and corrupt checkpoints; `load_sharded` refuses a checkpoint written with another layout (resume with
the same world size) and one whose file fails its checksum.

`full_state_dict(model, mesh)` gathers the routed experts from the EP ranks into the single-device
names and shapes (for HF export); `load_full_state_dict(model, sd, mesh)` does the reverse slice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsv3.parallel.expert_parallel import ExpertParallelMoE
from dsv3.parallel.mesh import Mesh, group_size

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(mesh: Mesh) -> None:
    if mesh.world_size > 1:
        dist.barrier(group=mesh.world_group)


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def save_sharded(
    path: str | Path, state: dict[str, Any], mesh: Mesh, meta: dict[str, Any] | None = None
) -> Path:
    """Collective: write this rank's `state`; the checkpoint appears at `path` only once all are on disk."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if mesh.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier(mesh)
    name = rank_file(mesh.rank)
    tmp = partial / (name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, partial / name)
    digest = _sha256(partial / name)
    digests: list[Any] = [None] * mesh.world_size
    if mesh.world_size > 1:
        dist.all_gather_object(digests, (name, digest), group=mesh.world_group)
    else:
        digests = [(name, digest)]
    if mesh.rank == 0:
        manifest = {
            "world_size": mesh.world_size,
            "layout": {k: getattr(mesh.config, k) for k in ("pp", "dp", "ep", "nodes")},
            "files": dict(digests),
            "meta": meta or {},
        }
        mtmp = partial / (MANIFEST + ".tmp")
        with open(mtmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(mtmp, partial / MANIFEST)
        _fsync_dir(partial)
        if path.exists():
            shutil.rmtree(path)
        os.replace(partial, path)
        _fsync_dir(path.parent)
    _barrier(mesh)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path} has no readable {MANIFEST} (incomplete or corrupt): {e}") from e


def verify(path: str | Path) -> dict[str, Any]:
    """Check every shard exists and matches its checksum; return the manifest or raise ValueError."""
    path = Path(path)
    m = read_manifest(path)
    for name, digest in m["files"].items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"checkpoint {path} is missing {name}")
        if _sha256(f) != digest:
            raise ValueError(f"checkpoint {path}: {name} fails its checksum (corrupt or truncated)")
    return m


def latest_complete(directory: str | Path, pattern: str = "step_*") -> Path | None:
    """Newest complete, verified checkpoint directory under `directory` (partial ones are skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for cand in sorted(
        (p for p in directory.glob(pattern) if p.is_dir() and not p.name.endswith(".partial")), reverse=True
    ):
        try:
            verify(cand)
            return cand
        except ValueError:
            continue
    return None


def load_sharded(path: str | Path, mesh: Mesh) -> tuple[dict[str, Any], dict[str, Any]]:
    """This rank's state and the checkpoint's meta. Same world size and layout as when saved."""
    path = Path(path)
    m = read_manifest(path)
    layout = {k: getattr(mesh.config, k) for k in ("pp", "dp", "ep", "nodes")}
    if m["world_size"] != mesh.world_size or m["layout"] != layout:
        raise ValueError(
            f"checkpoint {path} was written with world size {m['world_size']} and layout {m['layout']}; "
            f"this run has world size {mesh.world_size} and layout {layout} (resume with the same layout)"
        )
    name = rank_file(mesh.rank)
    f = path / name
    if not f.is_file() or _sha256(f) != m["files"].get(name):
        raise ValueError(f"checkpoint {path}: {name} is missing or fails its checksum")
    return torch.load(f, map_location="cpu", weights_only=False), m["meta"]


# --------------------------------------------------------------------------- full <-> sharded
def _expert_names(model: nn.Module) -> dict[str, ExpertParallelMoE]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelMoE):
            for w in ("w1", "w2", "w3"):
                out[f"{name}.experts.{w}"] = mod
    return out


@torch.no_grad()
def full_state_dict(model: nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """Collective over the EP group: the single-device state dict (experts concatenated over EP ranks)."""
    if mesh.pp > 1:
        raise ValueError("gathering a full state dict of a pipeline-parallel model is not supported")
    sd = model.state_dict()
    experts = _expert_names(model)
    for name, mod in experts.items():
        shard = sd[name].contiguous()
        n = group_size(mod.group)
        if n > 1:
            full = shard.new_empty((n * shard.shape[0], *shard.shape[1:]))
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(full, shard, group=mod.group)
            sd[name] = full
    return sd


@torch.no_grad()
def load_full_state_dict(
    model: nn.Module, sd: dict[str, torch.Tensor], mesh: Mesh, strict: bool = True
) -> None:
    """Load a single-device state dict into a parallelized model (each rank keeps its expert slice)."""
    experts = _expert_names(model)
    local = {}
    for k, v in sd.items():
        if k in experts:
            lo, hi = experts[k].expert_range
            if v.shape[0] != experts[k].n_routed_experts:
                raise ValueError(
                    f"{k}: expected {experts[k].n_routed_experts} experts, got shape {tuple(v.shape)}"
                )
            v = v[lo:hi]
        local[k] = v
    model.load_state_dict(local, strict=strict)
