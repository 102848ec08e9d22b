"""Round-trip laws for cq.io: write → read is bit-exact (both loader modes); comfy_quant encode → decode = id."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

pytest.importorskip("hypothesis")

import torch  # noqa: E402
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors import safe_open  # noqa: E402

from cq.io import (  # noqa: E402
    DTYPES,
    UnifiedSafetensorsLoader,
    decode_comfy_quant,
    encode_comfy_quant,
    write_safetensors,
)

DTYPE_NAMES = sorted(DTYPES)


def materialize(dtype_name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns of any dtype (NaN payloads, subnormals, ±0 included); bools are 0/1."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (nbytes,), generator=gen).to(torch.uint8).view(dtype).reshape(shape)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
# Names ending in ".comfy_quant" are excluded: the writer requires them to hold a valid quant config
# (tests/io/test_io_writer.py checks that it refuses anything else).
names = _text.filter(lambda s: s and s != "__metadata__" and not s.endswith(".comfy_quant"))
specs = st.tuples(st.sampled_from(DTYPE_NAMES), st.lists(st.integers(0, 5), max_size=3).map(tuple),
                  st.integers(0, 2**31 - 1))
files = st.dictionaries(names, specs, max_size=6)
metadata = st.dictionaries(_text, _text, max_size=3)


@given(files, metadata)
@example({}, {})
@example({"empty": ("F32", (0, 3), 0), "scalar": ("BF16", (), 1), "flag": ("BOOL", (2,), 2)}, {"k": "v"})
@example({"é.weight": ("F8_E4M3", (3, 2), 5), "x": ("I64", (1,), 6)}, {"": ""})
def test_write_then_read_is_bit_exact(spec, meta):
    tensors = {name: materialize(*s) for name, s in spec.items()}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        write_safetensors(path, tensors, metadata=meta)
        before = read_bytes(path)
        for low_memory in (True, False):
            with UnifiedSafetensorsLoader(path, low_memory=low_memory) as f:
                assert f.keys() == list(tensors)
                assert f.metadata() == meta
                for name, t in tensors.items():
                    assert f.get_shape(name) == tuple(t.shape) and f.get_dtype(name) == t.dtype
                    assert same_bits(f.get_tensor(name), t), (name, low_memory)
        with safe_open(path, "pt") as f:  # the independent reader ComfyUI uses on CPU
            assert (f.metadata() or {}) == meta
            for name, t in tensors.items():
                assert same_bits(f.get_tensor(name), t), name
        assert read_bytes(path) == before


json_scalars = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)
entries = st.builds(lambda fmt, rest: {"format": fmt, **{k: v for k, v in rest.items() if k != "format"}},
                    st.text(max_size=16), st.dictionaries(st.text(max_size=8), json_values, max_size=4))


@given(entries)
@example({"format": "int8_tensorwise"})
@example({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256})
@example({"format": "\x00", "nested": {"a": [None, 1.5]}})
def test_comfy_quant_encode_decode_identity(entry):
    t = encode_comfy_quant(entry)
    assert t.dtype == torch.uint8 and t.ndim == 1
    assert bytes(t.tolist()) == json.dumps(entry).encode()
    assert decode_comfy_quant(t) == entry
