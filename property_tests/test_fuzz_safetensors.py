"""Fuzzed reading (issue 8.9): a mutated safetensors file is read right or refused with cq's own error.

Law: for any valid file and any mutation of it (a byte, the length field, a header field, the
dtype, shape or offsets of an entry, a truncation, trailing bytes), ``read_header`` and both loader
modes either succeed, and then every tensor is exactly the file's bytes in its range (never a
byte past the end) and agrees with the ``safetensors`` library wherever that accepts the file
too, or raise :class:`cq.errors.InputError`. Never another exception, never a hang.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

import pytest

pytest.importorskip("hypothesis")

import torch  # noqa: E402
from hypothesis import event, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cq.errors import InputError  # noqa: E402
from cq.io import DTYPES, UnifiedSafetensorsLoader, read_header, write_safetensors  # noqa: E402

SMALL_DTYPES = ["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL", "F8_E4M3"]
#: values a fuzzed header field may take: valid-looking, wrong-typed, huge, negative, nested
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=6),
    st.lists(st.integers(-3, 2**40), max_size=4), st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.sampled_from(sorted(DTYPES)),
)


@st.composite
def valid_files(draw):
    """(bytes of a valid safetensors file, its tensors)."""
    n = draw(st.integers(1, 3))
    tensors = {}
    for i in range(n):
        dtype = DTYPES[draw(st.sampled_from(SMALL_DTYPES))]
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
        numel = 1
        for d in shape:
            numel *= d
        top = 1 if dtype == torch.bool else 255  # bool bytes other than 0/1 are corrupt data
        raw = torch.tensor(draw(st.lists(st.integers(0, top), min_size=numel * dtype.itemsize,
                                         max_size=numel * dtype.itemsize)), dtype=torch.uint8)
        tensors[f"t{i}.weight"] = raw.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
    meta = draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.safetensors")
        write_safetensors(p, tensors, metadata=meta)
        with open(p, "rb") as f:
            return f.read(), tensors


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, rest: bytes, *, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + rest


@st.composite
def mutated_files(draw):
    data, _ = draw(valid_files())
    kind = draw(st.sampled_from(["byte", "length", "field", "entry", "metadata", "truncate", "append", "offsets"]))
    n, header, rest = _split(data)
    names = [k for k in header if k != "__metadata__"]
    if kind == "byte":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    elif kind == "length":
        new = draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 16), n + 16))
        data = struct.pack("<Q", new) + data[8:]
    elif kind == "field":
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(ODD_VALUES)
        data = _join(header, rest)
    elif kind == "entry":
        name = draw(st.sampled_from(names))
        header[name] = draw(ODD_VALUES | st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
                                                         ODD_VALUES, max_size=4))
        data = _join(header, rest)
    elif kind == "metadata":
        header["__metadata__"] = draw(ODD_VALUES)
        data = _join(header, rest)
    elif kind == "offsets":  # plausible integers: overlaps, gaps, ranges past the end
        name = draw(st.sampled_from(names))
        a = draw(st.integers(0, len(rest) + 8))
        header[name]["data_offsets"] = [a, draw(st.integers(a, len(rest) + 16))]
        data = _join(header, rest)
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    else:
        data = data + draw(st.binary(min_size=1, max_size=16))
    return data


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist()) if t.numel() else b""


def _check(data: bytes) -> str:
    """Apply the law to ``data``; returns "read" or "refused"."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.safetensors")
        with open(p, "wb") as f:
            f.write(data)
        try:
            header = read_header(p)
            got = {}
            for low_memory in (True, False):
                with UnifiedSafetensorsLoader(p, low_memory=low_memory) as loader:
                    got[low_memory] = {k: loader.get_tensor(k) for k in loader.keys()}
        except InputError:
            return "refused"
        for name, info in header.tensors.items():
            assert 8 <= info.start <= info.end <= len(data)  # never a byte past the end
            for t in got.values():
                assert _bytes(t[name]) == data[info.start:info.end]
                assert tuple(t[name].shape) == info.shape and t[name].dtype == info.dtype
        try:
            from safetensors import safe_open

            with safe_open(p, framework="pt") as f:
                theirs = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # the library is stricter (gaps, alignment): nothing to compare with
            return "read"
        assert set(theirs) == set(got[True])
        for k, t in theirs.items():
            assert _bytes(t) == _bytes(got[True][k]) and t.dtype == got[True][k].dtype
        return "read"


@given(valid_files())
def test_valid_files_are_read_exactly(file):
    data, tensors = file
    assert _check(data) == "read"


@given(mutated_files())
@example(b"")  # empty file
@example(b"\xff" * 8)  # absurd length
@example(struct.pack("<Q", 2) + b"{}")  # no tensors at all: valid
@example(struct.pack("<Q", 2) + b"[]")  # a header that is not an object
@example(struct.pack("<Q", 4) + b"\xff\xfe{}")  # not UTF-8
@example(_join({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))  # unhashable dtype
@example(_join({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, b"\0" * 4))  # huge shape
@example(_join({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8))  # overlap
@example(_join({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"k": 1}}, b"\0" * 4))
@example(struct.pack("<Q", 200_001) + b"[" * 100_000 + b"]" * 100_001)  # nesting deeper than the recursion limit
@example(b"PK\x03\x04" + b"\0" * 60)  # a zip (torch.save) checkpoint
@example(_join({"a": {"dtype": "BOOL", "shape": [], "data_offsets": [0, 1]}}, b"\x02"))  # not a boolean
def test_mutated_files_are_read_right_or_refused_with_an_input_error(data):
    event(_check(data))
