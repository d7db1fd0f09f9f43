"""dsv3.io, the one atomic writer: permissions follow the umask, a full disk is one clear line and leaves
the previous version (native checkpoints, HF exports, single files) untouched."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from dsv3 import io as dio
from dsv3.config import ModelConfig
from dsv3.model import Transformer
from dsv3.train import checkpoint as ckpt


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("debug"))


def test_written_files_follow_the_umask(tmp_path, umask_027):
    from dsv3.checkpoint import save_pretrained

    dio.atomic_write(tmp_path / "a.json", b"{}")
    assert _mode(tmp_path / "a.json") == 0o640
    step = ckpt.save_checkpoint(tmp_path / "ckpt", 1, {"w": torch.ones(2)}, {"step": 1})
    assert _mode(step) == 0o750 and all(_mode(f) == 0o640 for f in step.iterdir())
    out = save_pretrained(_model(), tmp_path / "hf", dtype=torch.float32)
    assert _mode(out) == 0o750 and all(_mode(f) == 0o640 for f in out.iterdir())


def test_disk_full_during_hf_export_keeps_the_previous_export(tmp_path, monkeypatch):
    from dsv3.checkpoint import safetensors_io, save_pretrained

    out = save_pretrained(_model(), tmp_path / "hf", dtype=torch.float32)
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io, "save_file", full)
    with pytest.raises(dio.WriteError) as e:
        save_pretrained(_model(), out, dtype=torch.float32)
    assert "\n" not in str(e.value) and str(out) in str(e.value) and "No space left" in str(e.value)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary left behind


def test_disk_full_on_a_single_file_keeps_the_old_one(tmp_path, monkeypatch):
    dio.atomic_write(tmp_path / "f", b"old")

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dio, "write_synced", full)
    with pytest.raises(dio.WriteError, match="cannot write .*f: No space left on device"):
        dio.atomic_write(tmp_path / "f", b"new")
    assert (tmp_path / "f").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_dtype_names():
    assert dio.torch_dtype("bf16") is dio.torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="float32"):
        dio.torch_dtype("fp16", allowed=("float32", "bfloat16"))
