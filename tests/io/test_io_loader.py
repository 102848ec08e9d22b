"""Tests for cq.io.loader: the reference loader API, both modes, every dtype, and bad files."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _io_helpers import ALL_DTYPES, random_tensor, raw_file, same_bits, sha256
from cq.errors import InputError
from cq.io import DTYPES, MemoryEfficientSafeOpen, UnifiedSafetensorsLoader, read_header

SHAPES = [(3, 5), (7,), (), (0, 4), (2, 3, 4)]


def _dtype_id(d):
    return str(d).replace("torch.", "")


@pytest.fixture
def model_file(tmp_path):
    """A file written by safetensors itself with every dtype and awkward shapes, plus metadata."""
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for i, dtype in enumerate(ALL_DTYPES):
        for j, shape in enumerate(SHAPES):
            tensors[f"t{i}_{j}.{_dtype_id(dtype)}"] = random_tensor(dtype, shape, gen)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"source": "test", "note": "é"})
    return path, tensors


@pytest.mark.parametrize("low_memory", [True, False], ids=["streaming", "preload"])
def test_every_dtype_matches_safetensors(model_file, low_memory):
    path, tensors = model_file
    before = sha256(path)
    with UnifiedSafetensorsLoader(path, low_memory=low_memory) as f, safe_open(str(path), "pt") as ref:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata() == {"source": "test", "note": "é"}
        assert len(f) == len(tensors)
        for key, t in tensors.items():
            assert key in f
            assert f.get_shape(key) == tuple(t.shape)
            assert f.get_ndim(key) == t.ndim
            assert f.get_dtype(key) == t.dtype
            got = f.get_tensor(key)
            assert same_bits(got, t), key
            assert same_bits(got, ref.get_tensor(key)), key
    assert "missing" not in UnifiedSafetensorsLoader(path, low_memory=True)
    assert sha256(path) == before


def test_streaming_equals_preload(model_file):
    path, tensors = model_file
    with UnifiedSafetensorsLoader(path, low_memory=True) as s, UnifiedSafetensorsLoader(path) as p:
        assert s.keys() == p.keys()
        for key in tensors:
            assert same_bits(s.get_tensor(key), p.get_tensor(key))


def test_keys_in_header_order(tmp_path):
    # safetensors lays out by dtype/name; our keys() follows the header as written.
    header = {"z": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "a": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}
    raw_file(tmp_path / "f.safetensors", header, b"xyz")
    for low in (True, False):
        with UnifiedSafetensorsLoader(tmp_path / "f.safetensors", low_memory=low) as f:
            assert f.keys() == ["z", "a"]
            assert list(f) == ["z", "a"]
            assert f.get_tensor("a").tolist() == [ord("y"), ord("z")]


@pytest.mark.parametrize("low_memory", [True, False], ids=["streaming", "preload"])
def test_returned_tensors_are_owned(tmp_path, low_memory):
    path = tmp_path / "m.safetensors"
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    save_file({"w": w}, str(path))
    before = sha256(path)
    with UnifiedSafetensorsLoader(path, low_memory=low_memory) as f:
        a = f.get_tensor("w")
        a.mul_(0).add_(5)
        b = f.get_tensor("w")
        assert torch.equal(b, w)
        assert a.data_ptr() != b.data_ptr()
    assert sha256(path) == before


def test_metadata_is_a_copy_and_empty_when_absent(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with UnifiedSafetensorsLoader(path) as f:
        m = f.metadata()
        assert m == {}
        m["x"] = "y"
        assert f.metadata() == {}


def test_mark_processed_and_close(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(path))
    f = UnifiedSafetensorsLoader(path)
    f.mark_processed("a")
    with pytest.raises(InputError, match="mark_processed"):
        f.get_tensor("a")
    assert f.get_tensor("b").tolist() == [0.0, 0.0, 0.0]
    f.close()
    f.close()  # idempotent
    with pytest.raises(InputError, match="closed"):
        f.get_tensor("b")
    s = UnifiedSafetensorsLoader(path, low_memory=True)
    s.mark_processed("a")  # a no-op when streaming
    assert s.get_tensor("a").tolist() == [1.0, 1.0]
    s.close()
    with pytest.raises(KeyError, match="not a tensor of"):
        UnifiedSafetensorsLoader(path).get_shape("nope")


def test_alias():
    assert MemoryEfficientSafeOpen is UnifiedSafetensorsLoader


def test_streaming_reads_only_requested_bytes(tmp_path, monkeypatch):
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.zeros(1 << 18), "small": torch.arange(4.0)}, str(path))  # 1 MiB + 16 B
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self._f = f

        def readinto(self, b):
            reads.append(len(b))
            return self._f.readinto(b)

        def read(self, n=-1):
            reads.append(n)
            return self._f.read(n)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self._f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Spy(real_open(*a, **k)))
    with UnifiedSafetensorsLoader(path, low_memory=True) as f:
        assert f.get_tensor("small").tolist() == [0.0, 1.0, 2.0, 3.0]
    assert max(r for r in reads if r is not None) < 4096


# ---------------------------------------------------------------------------------------------
# Bad input: each case gives a one-line InputError naming the file, and the file is unchanged.

GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


def _bad_cases(tmp_path):
    cases = {}

    def case(name, builder, match):
        cases[name] = (builder, match)

    case("missing", lambda p: None, "no such file")
    case("directory", lambda p: p.mkdir(), "is a directory")
    case("empty", lambda p: p.write_bytes(b""), "too short")
    case("garbage", lambda p: p.write_bytes(os.urandom(4096)), "header length field")
    case("text", lambda p: p.write_bytes(b"this is not a safetensors file at all" * 10), "header length field")
    case("absurd_length", lambda p: p.write_bytes(struct.pack("<Q", 200_000_000) + b"{}" + bytes(200)),
         "header length field")
    case("not_json", lambda p: raw_file(p, b"{not json", bytes(16)), "not valid JSON")
    case("not_utf8", lambda p: raw_file(p, b"{\xff\xfe}", bytes(16)), "not UTF-8")
    case("not_object", lambda p: raw_file(p, b"[1, 2, 3]"), "must be a JSON object")
    case("duplicate_key", lambda p: raw_file(p, b'{"w": {}, "w": {}}'), "duplicate key")
    case("unknown_dtype", lambda p: raw_file(p, {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}},
                                              bytes(1)), "unknown dtype 'F4'")
    case("truncated", lambda p: raw_file(p, GOOD, bytes(10)), "truncated")
    case("size_mismatch", lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}},
                                              bytes(16)), "needs 16 bytes")
    case("overlap", lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                       bytes(12)), "overlap")
    case("bad_offsets", lambda p: raw_file(p, {"w": {"dtype": "U8", "shape": [1], "data_offsets": [3, 2]}},
                                            bytes(4)), "data_offsets")
    case("bad_shape", lambda p: raw_file(p, {"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}},
                                          bytes(1)), "shape")
    case("entry_not_object", lambda p: raw_file(p, {"w": 3}), "must be an object")
    case("entry_missing_field", lambda p: raw_file(p, {"w": {"dtype": "U8"}}), "lacks")
    case("metadata_not_str", lambda p: raw_file(p, {"__metadata__": {"k": 1}}), "__metadata__")
    case("metadata_not_map", lambda p: raw_file(p, {"__metadata__": []}), "__metadata__")
    return cases


CASE_NAMES = list(_bad_cases(None))


@pytest.mark.parametrize("low_memory", [True, False], ids=["streaming", "preload"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line_input_error(tmp_path, case, low_memory):
    builder, match = _bad_cases(tmp_path)[case]
    path = tmp_path / "bad.safetensors"
    builder(path)
    before = sha256(path) if path.is_file() else None
    with pytest.raises(InputError, match=match) as info:
        UnifiedSafetensorsLoader(path, low_memory=low_memory)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    if before is not None:
        assert sha256(path) == before


def test_truncation_while_open_is_reported(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(64)}, str(path))
    with UnifiedSafetensorsLoader(path, low_memory=True) as f:
        with open(path, "r+b") as g:
            g.truncate(os.path.getsize(path) - 8)
        with pytest.raises(InputError, match="truncated while open"):
            f.get_tensor("w")


def test_header_reports_gaps_and_trailing_bytes(tmp_path):
    path = tmp_path / "g.safetensors"
    raw_file(path, {"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"xyzw")
    h = read_header(path)
    assert h.gaps() == ["1 unused bytes before tensor 'a'", "2 trailing bytes after the last tensor"]
    with UnifiedSafetensorsLoader(path, low_memory=True) as f:  # readable, though safe_open refuses it
        assert f.get_tensor("a").tolist() == [ord("y")]


def test_zero_size_tensors_may_share_offsets(tmp_path):
    path = tmp_path / "z.safetensors"
    raw_file(path, {"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
                    "s": {"dtype": "I16", "shape": [], "data_offsets": [0, 2]}}, struct.pack("<h", -3))
    with UnifiedSafetensorsLoader(path, low_memory=True) as f:
        assert f.get_tensor("e").shape == (0, 3)
        assert f.get_tensor("s").item() == -3


def test_dtype_table_covers_the_brief():
    for name in ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
                 "U16", "U32", "U64"]:
        assert name in DTYPES
    assert json.dumps(sorted(DTYPES))  # names are plain strings
