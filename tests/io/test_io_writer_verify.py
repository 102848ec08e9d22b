"""The writer's read-back check: sampled CRC-32s by default (no second pass), every byte on request."""

from __future__ import annotations

import os

import pytest
import torch

import cq.io.writer as writer_mod
from cq.errors import CqError
from cq.io import SafetensorsWriter, UnifiedSafetensorsLoader


def _flip_after_write(monkeypatch, offset_in_data: int) -> None:
    """Flip one byte ``offset_in_data`` bytes into the data section just before the read-back check."""
    real_verify = SafetensorsWriter._verify

    def corrupt_then_verify(self, tmp):
        with open(tmp, "r+b") as f:
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n + offset_in_data)
            b = f.read(1)
            f.seek(8 + n + offset_in_data)
            f.write(bytes([b[0] ^ 0x01]))
        return real_verify(self, tmp)

    monkeypatch.setattr(SafetensorsWriter, "_verify", corrupt_then_verify)


def _write(path, verify="sampled"):
    big = torch.arange(1 << 18, dtype=torch.int32)  # 1 MiB: sampled, not read back whole
    with SafetensorsWriter(path, verify=verify) as w:
        w.add("small", torch.ones(3))
        w.add("big", big)
    return big


@pytest.mark.parametrize("where", [12, 12 + ((1 << 20) - 4096) // 15 + 10, 12 + (1 << 20) - 1], ids=["first", "window", "last"])
def test_sampled_check_catches_flips_in_its_windows(tmp_path, monkeypatch, where):
    _flip_after_write(monkeypatch, where)
    with pytest.raises(CqError, match="CRC-32 of sampled windows"):
        _write(tmp_path / "o.safetensors")
    assert os.listdir(tmp_path) == []


def test_sampled_check_does_not_read_the_file_back(tmp_path, monkeypatch):
    def no_second_pass(*a, **k):
        raise AssertionError("the default check re-read a whole tensor")

    monkeypatch.setattr(writer_mod, "_crc_range", no_second_pass)
    big = _write(tmp_path / "o.safetensors")
    with UnifiedSafetensorsLoader(tmp_path / "o.safetensors") as f:
        assert torch.equal(f.get_tensor("big"), big)


def test_full_checksum_catches_a_flip_anywhere(tmp_path, monkeypatch):
    between_windows = 12 + 4096 + 100  # past the first window, before the second
    _flip_after_write(monkeypatch, between_windows)
    with pytest.raises(CqError, match=r"\(CRC-32\)"):
        _write(tmp_path / "o.safetensors", verify="checksum")


def test_windows_cover_small_tensors_and_both_ends():
    assert writer_mod._windows(0) == []
    assert writer_mod._windows(100) == [(0, 100)]
    w = writer_mod._windows(10 << 20)
    assert len(w) == writer_mod.SAMPLE_WINDOWS and w[0][0] == 0 and w[-1][0] + w[-1][1] == 10 << 20
