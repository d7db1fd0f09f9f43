"""safetensors plumbing: checked headers, shard-by-shard reading, sharded writing, atomic directories.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
offsets) and the data. The header is parsed here before any tensor is read, so a truncated or corrupt
file fails with a message naming the file instead of deep inside the reader, and names, shapes and
dtypes of a whole checkpoint can be checked before a single weight is loaded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv3 import io as dio

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_ITEMSIZE |= {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype string: F32, BF16, F8_E4M3, ...
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one file's header: ValueError naming the file if it is truncated or corrupt."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        out: dict[str, TensorInfo] = {}
        end = 0
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, stop = meta["data_offsets"]
            shape = tuple(int(s) for s in meta["shape"])
            dtype = meta["dtype"]
            if dtype in _ITEMSIZE and stop - start != math.prod(shape) * _ITEMSIZE[dtype]:
                raise ValueError(f"tensor {name!r}: {stop - start} bytes for shape {shape} of {dtype}")
            end = max(end, stop)
            out[name] = TensorInfo(path, dtype, shape)
        if 8 + n + end > size:
            raise ValueError(f"data ends at byte {8 + n + end} but the file has {size} bytes (truncated?)")
        return out
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupt or truncated safetensors file {path}: {e}") from None


def checkpoint_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of an HF model directory (sharded with an index, or one model.safetensors)."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"corrupt {index}: {e}") from None
        headers: dict[str, dict[str, TensorInfo]] = {}
        out: dict[str, TensorInfo] = {}
        for name, fname in weight_map.items():
            if fname not in headers:
                fpath = model_dir / fname
                if not fpath.is_file():
                    raise ValueError(f"{index} lists shard {fname} for {name!r}, but {fpath} does not exist")
                headers[fname] = read_header(fpath)
            if name not in headers[fname]:
                raise ValueError(f"{index} puts tensor {name!r} in {fname}, which has no such tensor")
            out[name] = headers[fname][name]
        return out
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return read_header(single)
    raise ValueError(f"no {SINGLE_NAME} or {INDEX_NAME} in {model_dir}")


class ShardReader:
    """Reads tensors file by file (memory-mapped; one tensor materialised at a time)."""

    def __init__(self) -> None:
        self._open: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()

    def get(self, name: str, info: TensorInfo) -> torch.Tensor:
        try:
            if info.file not in self._open:
                self._open[info.file] = self._stack.enter_context(safe_open(str(info.file), framework="pt"))
            return self._open[info.file].get_tensor(name)
        except Exception as e:  # the safetensors reader raises its own error types
            raise ValueError(f"cannot read tensor {name!r} from {info.file}: {e}") from None

    def close(self) -> None:
        self._stack.close()
        self._open.clear()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_size(size: int | str) -> int:
    """5_000_000_000, "5GB", "500MB", "64KiB" -> bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (use bytes or e.g. '5GB', '500MB')")
    base = 1024 if m[3] else 1000
    value = float(m[1]) * base ** " KMGT".index(m[2] or " ")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return int(value)


class ShardWriter:
    """Streams (name, tensor) pairs into shards of at most max_bytes (a tensor larger than that gets its
    own shard), then names them model-0000i-of-0000n.safetensors with an index, as HF does; a checkpoint
    that fits in one shard is a single model.safetensors."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir = out_dir
        self.max_bytes = max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = t.detach().contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.out_dir / SINGLE_NAME)
            return
        weight_map = {}
        for i, (path, names) in enumerate(self._shards, start=1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _looks_like_model_dir(path: Path) -> bool:
    entries = list(path.iterdir())
    return not entries or ((path / "config.json").is_file() and all(e.is_file() for e in entries))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, keep_files: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename (dsv3.io's
    writer: files fsynced, permissions from the umask; an OSError is one WriteError line naming `path`,
    with the old directory untouched).

    An existing `path` must be an HF model directory (config.json and plain files) or empty: a run
    directory or anything else is refused rather than replaced. With keep_files, files of the old
    directory that the new one lacks (tokenizer, generation config) are carried over, except weights."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    if path.is_dir() and not _looks_like_model_dir(path):
        raise ValueError(
            f"refusing to replace {path}: it is not an HF model directory (no config.json, or subfolders)"
        )
    with dio.atomic_dir(path) as tmp:
        yield tmp
        if path.is_dir() and keep_files:
            for old in path.iterdir():
                weights = old.name.endswith(".safetensors") or old.name == INDEX_NAME
                if not weights and not (tmp / old.name).exists():
                    shutil.copy2(old, tmp / old.name)
