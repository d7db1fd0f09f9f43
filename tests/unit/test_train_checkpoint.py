"""Native checkpoints: round trip, keep-last-N, and detection of truncated/corrupted/incomplete ones."""

from __future__ import annotations

import torch

from dsv3.train import checkpoint as ckpt


def _save(root, step, keep=3):
    model = {"w": torch.full((4, 4), float(step)), "b": torch.arange(3.0)}
    state = {
        "step": step,
        "opt": {"m": torch.ones(2) * step},
        "rng": torch.get_rng_state(),
        "cfg": {"x": [1, None]},
    }
    return ckpt.save_checkpoint(root, step, model, state, keep=keep)


def test_round_trip_and_keep_last(tmp_path):
    for s in (10, 20, 30, 40):
        _save(tmp_path, s, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    model, state = ckpt.load_checkpoint(tmp_path / "step_00000040")
    assert torch.equal(model["w"], torch.full((4, 4), 40.0)) and state["step"] == 40
    assert torch.equal(state["opt"]["m"], torch.ones(2) * 40) and state["cfg"] == {"x": [1, None]}
    assert not list(tmp_path.glob(".tmp-*"))


def test_corrupted_newest_falls_back_with_its_name(tmp_path):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    f = newest / ckpt.MODEL_FILE
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # flip bits: same size, wrong checksum
    f.write_bytes(bytes(data))
    warnings = []
    good = ckpt.latest_good_checkpoint(tmp_path, warn=warnings.append)
    assert good.name == "step_00000010"
    assert "step_00000020" in warnings[0] and "checksum" in warnings[0]


def test_truncated_and_incomplete_are_detected(tmp_path):
    _save(tmp_path, 10)
    p20 = _save(tmp_path, 20)
    p30 = _save(tmp_path, 30, keep=5)
    st = p30 / ckpt.STATE_FILE
    st.write_bytes(st.read_bytes()[:100])  # truncated
    (p20 / ckpt.MANIFEST).unlink()  # incomplete
    warnings = []
    assert ckpt.latest_good_checkpoint(tmp_path, warn=warnings.append).name == "step_00000010"
    assert "truncated" in warnings[0] and "step_00000030" in warnings[0]
    assert "incomplete" in warnings[1] and "step_00000020" in warnings[1]


def test_resave_same_step_and_stale_tmp_cleanup(tmp_path):
    (tmp_path / ".tmp-step_00000005-1").mkdir(parents=True)
    _save(tmp_path, 5)
    _save(tmp_path, 5)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000005"]
    assert not list(tmp_path.glob(".tmp-*"))
    ckpt.verify_checkpoint(tmp_path / "step_00000005")


def test_no_checkpoint(tmp_path):
    assert ckpt.latest_good_checkpoint(tmp_path / "none") is None


def test_disk_full_is_one_line_naming_the_path_and_keeps_the_previous(tmp_path, monkeypatch):
    import errno

    import pytest

    from dsv3 import io as dio

    _save(tmp_path, 10)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(dio, "write_synced", full)
    with pytest.raises(ValueError) as e:
        _save(tmp_path, 20)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg
    assert str(tmp_path / "step_00000020") in msg and "intact (newest: step_00000010)" in msg
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000010"]
    ckpt.verify_checkpoint(tmp_path / "step_00000010")
    assert not list(tmp_path.glob(".tmp-*"))


def test_layout_is_checked_on_load(tmp_path):
    import pytest

    from dsv3.config import ParallelConfig
    from dsv3.parallel import Mesh

    _save(tmp_path, 1)
    with pytest.raises(ValueError, match="same layout"):
        ckpt.load_checkpoint(tmp_path / "step_00000001", Mesh(config=ParallelConfig(dp=2), rank=1, dp_rank=1))
