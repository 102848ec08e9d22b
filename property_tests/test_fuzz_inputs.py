"""Fuzzed reading of cq's other inputs (issue 8.9): calibration files, layer configs, LoRA files.

Law: whatever the bytes or JSON values, reading either succeeds (and every accessor of the result
works or refuses too) or raises cq's own error (:class:`cq.errors.CqError`: ``InputError`` for
files, ``ConfigError`` for settings). Never another exception. LoRA files are read through the
public ``cq.load_lora_tensors`` / ``cq.load_lora_for_merging``, whatever module implements them.
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

import cq  # noqa: E402
from cq.calibrate import hessian_finalize, hessian_init, hessian_update  # noqa: E402
from cq.io.calibration import load_calibration, save_calibration  # noqa: E402
from cq.errors import CqError  # noqa: E402
from cq.io import write_safetensors  # noqa: E402
from cq.io.layer_config import load_layer_config  # noqa: E402

#: JSON values of every kind, nested a little
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _mutate(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["byte", "length", "truncate", "append", "none"]))
    if kind == "byte" and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(0, len(data)))) + data[8:]
    if kind == "truncate":
        return data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    return data


def _in_tmp(name: str, data: bytes, read):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, name)
        with open(p, "wb") as f:
            f.write(data)
        try:
            read(p)
        except CqError:
            return "refused"
        return "read"


# -- calibration files ------------------------------------------------------------------------------


def _read_calibration(p):
    cal = load_calibration(p)
    for layer in cal.layers:
        for k in (None, 3):
            cal.hessian(layer, k=k)
        cal.input_absmax(layer), cal.input_mean(layer), cal.input_abs_mean(layer), cal.input_scale(layer)
        cal.layer_samples(layer), cal.hessian_kind(layer)


def _cq_calibration_bytes(seed: int) -> bytes:
    st_ = hessian_finalize(hessian_update(hessian_init(3), torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))))
    with tempfile.TemporaryDirectory() as d:
        p = save_calibration(os.path.join(d, "c.safetensors"), {"blk.fc": st_, "blk.fc2": st_})
        return p.read_bytes()


@st.composite
def calibration_safetensors(draw):
    data = _cq_calibration_bytes(draw(st.integers(0, 3)))
    if draw(st.booleans()):  # rewrite the header with a fuzzed entry or metadata field
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        key = draw(st.sampled_from(sorted(header)))
        if key == "__metadata__":
            header[key][draw(st.sampled_from(["format", "samples", "x"]))] = draw(st.text(max_size=6))
        else:
            header[key][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON)
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    return _mutate(draw, data)


@given(calibration_safetensors())
@example(b"")
@example(b"PK\x03\x04" + b"\0" * 60)
def test_fuzzed_calibration_safetensors_read_or_refused(data):
    event(_in_tmp("c.safetensors", data, _read_calibration))


@given(JSON | st.dictionaries(st.text(max_size=6), JSON | st.dictionaries(
    st.sampled_from(["channel_max", "channel_mean", "input_scale", "x"]), JSON, max_size=3), max_size=3))
@example({"blk.fc": {"channel_max": [1.0, 2.0, -3.0]}})
@example({"blk.fc": {"channel_max": [[1.0], [2.0]]}})
@example({"blk.fc": {"channel_max": [1e400]}})
@example({"blk.fc": {"channel_mean": [1.0, 2.0, 3.0], "channel_max": [1.0, 2.0]}})
@example({"blk.fc": {"input_scale": [1.0, 2.0]}})
@example({"blk.fc": True})
def test_fuzzed_reference_json_calibration_read_or_refused(value):
    data = json.dumps(value).encode()
    event(_in_tmp("c.json", data, _read_calibration))


@given(st.binary(max_size=64))
@example(b"\xff\xfe")
@example(b"{" * 5000)
@example(b"[" * 100_000)
def test_json_calibration_bytes_read_or_refused(data):
    event(_in_tmp("c.json", data, _read_calibration))


# -- layer configs ------------------------------------------------------------------------------


LAYER_KEYS = ["format", "scaling_mode", "block_size", "skip", "simple", "full_precision_matrix_mult", "x"]


@given(JSON | st.dictionaries(st.text(max_size=8) | st.sampled_from(["_default", "layer_patterns", "["]),
                              JSON | st.dictionaries(st.sampled_from(LAYER_KEYS), JSON, max_size=3), max_size=3))
@example({"(": {"format": "int8_tensorwise"}})
@example({"attn": {"format": "int8_blockwise", "block_size": -1}})
@example({"layer_patterns": [1, 2]})
@example({"_default": {"format": None}})
def test_fuzzed_layer_configs_load_or_raise_config_errors(value):
    try:
        load_layer_config(value)
        verdict = "read"
    except CqError:
        verdict = "refused"
    event(verdict)
    event(_in_tmp("lc.json", json.dumps(value).encode(), load_layer_config))


@given(st.binary(max_size=64))
@example(b'{"a": 1, "a": 2}')
@example(b"[" * 100_000)
def test_layer_config_bytes_load_or_raise_config_errors(data):
    event(_in_tmp("lc.json", data, load_layer_config))


# -- LoRA files ---------------------------------------------------------------------------------


def _lora_bytes(rank: int, alpha: bool) -> bytes:
    g = torch.Generator().manual_seed(rank)
    tensors = {"lora_unet_fc.lora_down.weight": torch.randn(rank, 8, generator=g),
               "lora_unet_fc.lora_up.weight": torch.randn(4, rank, generator=g),
               "diffusion_model.blk.lora_A.weight": torch.randn(rank, 8, generator=g),
               "diffusion_model.blk.lora_B.weight": torch.randn(4, rank, generator=g)}
    if alpha:
        tensors["lora_unet_fc.alpha"] = torch.tensor(float(rank))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "l.safetensors")
        write_safetensors(p, tensors)
        with open(p, "rb") as f:
            return f.read()


@st.composite
def lora_files(draw):
    data = _lora_bytes(draw(st.integers(1, 3)), draw(st.booleans()))
    if draw(st.booleans()):  # a fuzzed header field (shapes that disagree, odd dtypes, wrong ranks)
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape"]))
        header[key][field] = draw(st.sampled_from(["F16", "I8", "BOOL", "U8", "F64"]) if field == "dtype"
                                  else st.lists(st.integers(0, 8), max_size=3))
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    return _mutate(draw, data)


def _read_lora(p):
    cq.load_lora_tensors(p)
    cq.load_lora_for_merging(p)


@given(lora_files())
@example(b"")
@example(b"\x80\x02" + b"\0" * 30)
def test_fuzzed_lora_files_read_or_refused(data):
    event(_in_tmp("l.safetensors", data, _read_lora))
