"""Tests for cq.io.writer: safetensors-valid output, bit-exact round trips, atomicity, refusals."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

import cq.io.writer as writer_mod
from _io_helpers import ALL_DTYPES, random_tensor, same_bits, sha256
from cq.errors import CqError, InputError
from cq.io import (
    QUANT_METADATA_KEY,
    SafetensorsWriter,
    UnifiedSafetensorsLoader,
    encode_comfy_quant,
    quantization_metadata,
    read_header,
    write_safetensors,
)


def _leftovers(directory) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.endswith(".tmp"))


def test_every_dtype_round_trips_through_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for i, dtype in enumerate(ALL_DTYPES):
        for j, shape in enumerate([(5, 3), (), (0,), (2, 1, 3)]):
            tensors[f"t{i}.{j}"] = random_tensor(dtype, shape, gen)
    path = tmp_path / "all.safetensors"
    write_safetensors(path, tensors, metadata={"a": "1", "b": "ü"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"a": "1", "b": "ü"}
        for key, t in tensors.items():
            assert same_bits(f.get_tensor(key), t), key
    for low in (True, False):
        with UnifiedSafetensorsLoader(path, low_memory=low) as f:
            assert f.keys() == list(tensors)
            for key, t in tensors.items():
                assert same_bits(f.get_tensor(key), t), key
    assert _leftovers(tmp_path) == []


def test_header_layout_is_canonical(tmp_path):
    path = tmp_path / "h.safetensors"
    write_safetensors(path, {"b": torch.ones(3, dtype=torch.int8), "a": torch.zeros(2, 2)})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    text = raw[8:8 + n].decode()
    assert text.rstrip(" ") == text.rstrip() and text.startswith("{")
    header = json.loads(text)
    assert "__metadata__" not in header  # only present when non-empty
    assert list(header) == ["b", "a"]
    assert header["b"]["data_offsets"] == [0, 3] and header["a"]["data_offsets"] == [3, 19]
    assert len(raw) == 8 + n + 19
    assert read_header(path).gaps() == []


def test_empty_file_is_valid(tmp_path):
    path = tmp_path / "e.safetensors"
    write_safetensors(path, {})
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == []


def test_non_contiguous_and_parameter_inputs(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    path = tmp_path / "nc.safetensors"
    write_safetensors(path, {"t": base.t(), "s": base[1:, ::2], "p": torch.nn.Parameter(base.clone())})
    with UnifiedSafetensorsLoader(path, low_memory=True) as f:
        assert torch.equal(f.get_tensor("t"), base.t())
        assert torch.equal(f.get_tensor("s"), base[1:, ::2])
        assert torch.equal(f.get_tensor("p"), base)


def test_creates_parent_and_replaces_existing(tmp_path):
    path = tmp_path / "deep" / "er" / "o.safetensors"
    write_safetensors(path, {"x": torch.ones(1)})
    write_safetensors(path, {"y": torch.zeros(2)})
    with UnifiedSafetensorsLoader(path) as f:
        assert f.keys() == ["y"]
    assert _leftovers(path.parent) == []


def test_streams_bytes_as_they_are_added(tmp_path):
    path = tmp_path / "s.safetensors"
    with SafetensorsWriter(path) as w:
        # Tensors larger than the file buffer go straight to disk: nothing accumulates in memory.
        w.add("a", torch.ones(1 << 18))
        temp = _leftovers(tmp_path)
        reserve = writer_mod.HEADER_RESERVE
        assert len(temp) == 1 and os.path.getsize(tmp_path / temp[0]) == reserve + (1 << 20)
        assert not path.exists()
        w.add("b", torch.ones(1 << 18))
        assert os.path.getsize(tmp_path / temp[0]) == reserve + (2 << 20)
        assert "a" in w and len(w) == 2
    assert _leftovers(tmp_path) == []


def test_exception_mid_write_leaves_nothing(tmp_path):
    path = tmp_path / "o.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path) as w:
            w.add("a", torch.ones(8))
            raise RuntimeError("boom")
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_exception_keeps_existing_output(tmp_path):
    path = tmp_path / "o.safetensors"
    write_safetensors(path, {"old": torch.ones(2)})
    before = sha256(path)
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(path) as w:
            w.add("new", torch.zeros(4))
            raise KeyboardInterrupt
    assert sha256(path) == before
    assert _leftovers(tmp_path) == []


def test_abort_and_reuse_rules(tmp_path):
    path = tmp_path / "o.safetensors"
    w = SafetensorsWriter(path)
    with pytest.raises(CqError, match="outside the writer"):
        w.add("a", torch.ones(1))
    with w:
        w.add("a", torch.ones(1))
        w.abort()
        w.abort()
    assert not path.exists() and os.listdir(tmp_path) == []
    with pytest.raises(CqError, match="entered once"):
        with w:
            pass


def test_forgotten_writer_cleans_up(tmp_path):
    w = SafetensorsWriter(tmp_path / "o.safetensors").__enter__()
    w.add("a", torch.ones(4))
    assert _leftovers(tmp_path)
    del w
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("how", ["same", "relative", "symlink", "hardlink"])
def test_output_equal_to_input_is_refused(tmp_path, how, monkeypatch):
    src = tmp_path / "in.safetensors"
    write_safetensors(src, {"w": torch.ones(3)})
    before = sha256(src)
    if how == "same":
        out = src
    elif how == "relative":
        monkeypatch.chdir(tmp_path)
        out = "./sub/../in.safetensors"
        os.mkdir(tmp_path / "sub")
    elif how == "symlink":
        out = tmp_path / "link.safetensors"
        out.symlink_to(src)
    else:
        out = tmp_path / "hard.safetensors"
        os.link(src, out)
    with pytest.raises(InputError, match="is the input file") as info:
        write_safetensors(out, {"w": torch.zeros(3)}, forbid=[src])
    assert "\n" not in str(info.value)
    assert sha256(src) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name, tensor, match", [
    ("", torch.ones(1), "not allowed"),
    ("__metadata__", torch.ones(1), "not allowed"),
    (3, torch.ones(1), "not allowed"),
    ("x", [1.0], "must be a torch.Tensor"),
    ("x", torch.ones(1, dtype=torch.complex128), "cannot store"),
])
def test_bad_add_arguments(tmp_path, name, tensor, match):
    with pytest.raises(CqError, match=match):
        with SafetensorsWriter(tmp_path / "o.safetensors") as w:
            w.add(name, tensor)
    assert os.listdir(tmp_path) == []


def test_duplicates_and_bad_metadata(tmp_path):
    with pytest.raises(CqError, match="already added"):
        with SafetensorsWriter(tmp_path / "o.safetensors") as w:
            w.add("a", torch.ones(1))
            w.add("a", torch.ones(1))
    with pytest.raises(CqError, match="must be str"):
        SafetensorsWriter(tmp_path / "o.safetensors", metadata={"k": 1})
    with pytest.raises(InputError, match="directory"):
        SafetensorsWriter(tmp_path)
    assert os.listdir(tmp_path) == []


def test_comfy_metadata_must_match_tensors(tmp_path):
    entry = {"format": "int8_tensorwise"}
    good = {"fc.weight": torch.ones(2, 2, dtype=torch.int8), "fc.weight_scale": torch.ones(()),
            "fc.comfy_quant": encode_comfy_quant(entry)}
    path = tmp_path / "ok.safetensors"
    write_safetensors(path, good, metadata={QUANT_METADATA_KEY: quantization_metadata({"fc": entry})})
    assert path.exists()
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(CqError, match="disagrees"):
        write_safetensors(bad, good, metadata={QUANT_METADATA_KEY: quantization_metadata(
            {"fc": {"format": "int8_tensorwise", "convrot": True}})})
    with pytest.raises(CqError, match="NUL"):
        write_safetensors(bad, {"fc.comfy_quant": torch.zeros(29, dtype=torch.uint8)})
    assert not bad.exists() and _leftovers(tmp_path) == []


def test_corruption_between_write_and_read_back_is_caught(tmp_path, monkeypatch):
    """A flipped byte on disk (bad storage, concurrent writer) fails the CRC check and publishes nothing."""
    path = tmp_path / "o.safetensors"
    write_safetensors(path, {"old": torch.ones(1)})
    before = sha256(path)
    real_verify = SafetensorsWriter._verify

    def corrupt_then_verify(self, tmp):
        with open(tmp, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        return real_verify(self, tmp)

    monkeypatch.setattr(SafetensorsWriter, "_verify", corrupt_then_verify)
    with pytest.raises(CqError, match="CRC-32"):
        write_safetensors(path, {"w": torch.arange(10.0)})
    assert sha256(path) == before
    assert _leftovers(tmp_path) == []


def test_plain_copy_fallback(tmp_path, monkeypatch):
    """Where copy_file_range is unavailable the buffered copy gives the same file."""
    t = {"w": torch.arange(1000.0)}
    write_safetensors(tmp_path / "a.safetensors", t)
    monkeypatch.delattr(writer_mod.os, "copy_file_range", raising=False)
    write_safetensors(tmp_path / "b.safetensors", t)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize("path_kind", ["one_pass", "header_too_big"])
def test_large_file_paths_are_valid_safetensors(tmp_path, monkeypatch, path_kind):
    """Big files get their header written into the reserved region; oversized headers fall back to a copy."""
    monkeypatch.setattr(writer_mod, "COMPACT_BELOW", 0)
    if path_kind == "header_too_big":
        monkeypatch.setattr(writer_mod, "HEADER_RESERVE", 64)
    gen = torch.Generator().manual_seed(8)
    tensors = {f"layer.{i}.weight": random_tensor(ALL_DTYPES[i % len(ALL_DTYPES)], (i + 1, 3), gen)
               for i in range(12)}
    path = tmp_path / "big.safetensors"
    write_safetensors(path, tensors, metadata={"m": "x"})
    h = read_header(path)
    if path_kind == "one_pass":
        assert h.data_start == writer_mod.HEADER_RESERVE
    else:
        assert h.data_start < 1024 and h.data_start % 8 == 0
    assert h.gaps() == []
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"m": "x"}
        for k, t in tensors.items():
            assert same_bits(f.get_tensor(k), t)
    assert _leftovers(tmp_path) == []


def test_output_gets_default_permissions(tmp_path):
    path = tmp_path / "p.safetensors"
    write_safetensors(path, {"a": torch.ones(1)})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_lazy_views_are_written_by_value(tmp_path):
    z = torch.complex(torch.arange(3.0), torch.ones(3))
    path = tmp_path / "c.safetensors"
    write_safetensors(path, {"conj": z.conj(), "neg": torch.arange(4.0)._neg_view()})
    with UnifiedSafetensorsLoader(path, low_memory=True) as f:
        assert torch.equal(f.get_tensor("conj"), z.conj().resolve_conj())
        assert f.get_tensor("neg").tolist() == [-0.0, -1.0, -2.0, -3.0]


def test_disk_full_mid_write_leaves_nothing(tmp_path):
    path = tmp_path / "o.safetensors"
    with pytest.raises(CqError, match="disk full"):
        with SafetensorsWriter(path) as w:
            w.add("a", torch.ones(4))

            def full(_):
                raise OSError(28, "No space left on device")

            w._data.write = full
            w.add("b", torch.ones(4))
    assert os.listdir(tmp_path) == []
    with pytest.raises(CqError, match="outside the writer"):
        w.add("c", torch.ones(1))


def test_metadata_can_be_completed_before_commit(tmp_path):
    entry = {"format": "int8_tensorwise"}
    path = tmp_path / "m.safetensors"
    with SafetensorsWriter(path, metadata={"source": "in.safetensors"}, verify="header") as w:
        w.add("fc.weight", torch.ones(2, 2, dtype=torch.int8))
        w.add("fc.weight_scale", torch.ones(()))
        w.add("fc.comfy_quant", encode_comfy_quant(entry))
        w.update_metadata({QUANT_METADATA_KEY: quantization_metadata({"fc": entry})})
        with pytest.raises(CqError, match="must be str"):
            w.update_metadata({"n": 3})
    with UnifiedSafetensorsLoader(path) as f:
        assert set(f.metadata()) == {"source", QUANT_METADATA_KEY}
    with pytest.raises(CqError, match="after the file was done"):
        w.update_metadata({"late": "x"})
    with pytest.raises(CqError, match="verify="):
        SafetensorsWriter(path, verify="none")
