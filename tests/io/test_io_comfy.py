"""Tests for cq.io.comfy: .comfy_quant entries and bytes, per-layer tensor layouts, refusals."""

from __future__ import annotations

import json
import warnings

import attrs
import pytest
import torch

from cq.errors import CqError, InputError
from cq.io import (
    NonNativeFormatWarning,
    comfy_quant_entry,
    decode_comfy_quant,
    encode_comfy_quant,
    layer_tensors,
    quantization_metadata,
)
from cq.state import LayerState, PerBlock, PerGroup, PerRow, PerTensor
from cq.transforms import ConvRot, ScaleConfig, absmax_scale, fp16_cast, round_to_nearest


def quantized(name="blk.0.fc", n=8, k=16, gran=PerRow(), seed=0, bias=False) -> LayerState:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    return round_to_nearest(absmax_scale(LayerState.from_weight(name, w, bias=b), cfg=ScaleConfig(gran)))


@attrs.frozen
class OpaqueRotation(ConvRot):
    """A basis that claims to be native but has no .comfy_quant fields: must be refused."""

    def comfy_fields(self):
        return {}


# -- encode / decode -----------------------------------------------------------------------------


@pytest.mark.parametrize("entry, nbytes", [
    ({"format": "int8_tensorwise"}, 29),
    ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}, 72),
    ({"format": "float8_e4m3fn", "full_precision_matrix_mult": True}, 63),
    ({"format": "int8_blockwise", "group_size": 128}, 47),
    ({"format": "int8_axiswise"}, 27),
])
def test_encode_matches_comfyui_bytes(entry, nbytes):
    t = encode_comfy_quant(entry)
    assert t.dtype == torch.uint8 and t.ndim == 1 and t.numel() == nbytes
    assert bytes(t.tolist()) == json.dumps(entry).encode()
    assert decode_comfy_quant(t) == entry


def test_tensorwise_bytes_exactly():
    assert bytes(encode_comfy_quant({"format": "int8_tensorwise"}).tolist()) == b'{"format": "int8_tensorwise"}'


@pytest.mark.parametrize("raw, match", [
    (bytes(29), "NUL"),
    (b'{"format": "int8_tensorwise"}\x00\x00\x00', "NUL"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"format": ', "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"group_size": 3}', "lacks a string 'format'"),
    (b"", "empty"),
])
def test_decode_errors_are_clear(raw, match):
    t = torch.tensor(list(raw), dtype=torch.uint8)
    with pytest.raises(InputError, match=match) as info:
        decode_comfy_quant(t, name="blk.comfy_quant")
    assert "blk.comfy_quant" in str(info.value) and "\n" not in str(info.value)


def test_decode_rejects_wrong_tensor_kind():
    with pytest.raises(InputError, match="1-D uint8"):
        decode_comfy_quant(torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(CqError, match="str 'format'"):
        encode_comfy_quant({"group_size": 1})


def test_quantization_metadata_schema():
    layers = {"a": {"format": "int8_tensorwise"}, "model.b": {"format": "int8_blockwise", "group_size": 64}}
    s = quantization_metadata(layers)
    assert json.loads(s) == {"format_version": "1.0", "layers": layers}
    assert s.startswith('{"format_version": "1.0", "layers": {"a": {"format": "int8_tensorwise"}')


# -- comfy_quant_entry ---------------------------------------------------------------------------


def test_entry_fields_in_order():
    s = attrs.evolve(quantized(k=32), basis=ConvRot(16))
    e = comfy_quant_entry(s, full_precision_matrix_mult=True)
    assert list(e.items()) == [("format", "int8_tensorwise"), ("convrot", True), ("convrot_groupsize", 16),
                               ("full_precision_matrix_mult", True)]
    assert comfy_quant_entry(quantized(gran=PerBlock(4))) == {"format": "int8_blockwise", "group_size": 4}
    assert comfy_quant_entry(quantized(gran=PerGroup(8))) == {"format": "int8_blockwise", "group_size": 8}
    assert comfy_quant_entry(quantized(gran=PerTensor()), legacy_axiswise=True) == {"format": "int8_tensorwise"}


def test_entry_refuses_bad_states():
    with pytest.raises(CqError, match="cannot write format None"):
        comfy_quant_entry(LayerState.from_weight("fc", torch.ones(2, 2)))
    with pytest.raises(CqError, match="does not match granularity"):
        comfy_quant_entry(attrs.evolve(quantized(), format="int8_blockwise"))
    with pytest.raises(CqError, match="no ComfyUI-native"):
        comfy_quant_entry(attrs.evolve(quantized(), basis=OpaqueRotation(16)))


# -- layer_tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize("gran, scale_shape", [
    (PerTensor(), ()),
    (PerRow(), (8, 1)),
], ids=["tensor", "row"])
def test_native_layouts(gran, scale_shape):
    s = quantized(gran=gran, bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native formats never warn
        out = layer_tensors(s)
    assert list(out) == ["blk.0.fc.weight", "blk.0.fc.weight_scale", "blk.0.fc.comfy_quant", "blk.0.fc.bias"]
    w, sc = out["blk.0.fc.weight"], out["blk.0.fc.weight_scale"]
    assert w.dtype == torch.int8 and w.shape == (8, 16) and w.is_contiguous()
    assert torch.equal(w, s.codes)
    assert sc.dtype == torch.float32 and tuple(sc.shape) == scale_shape
    assert bool((sc > 0).all() and torch.isfinite(sc).all())
    assert decode_comfy_quant(out["blk.0.fc.comfy_quant"]) == {"format": "int8_tensorwise"}
    assert out["blk.0.fc.bias"].dtype == torch.bfloat16 and torch.equal(out["blk.0.fc.bias"], s.bias)


def test_square_row_scale_is_never_1d():
    out = layer_tensors(quantized(n=16, k=16))
    assert tuple(out["blk.0.fc.weight_scale"].shape) == (16, 1)


@pytest.mark.parametrize("gran, scale_shape, fmt", [
    (PerBlock(4), (2, 4), "int8_blockwise"),
    (PerGroup(8), (8, 2, 1), "int8_blockwise"),
], ids=["block", "group"])
def test_blockwise_layouts_warn(gran, scale_shape, fmt):
    with pytest.warns(NonNativeFormatWarning, match="vanilla ComfyUI") as rec:
        out = layer_tensors(quantized(gran=gran))
    assert len(rec) == 1
    assert tuple(out["blk.0.fc.weight_scale"].shape) == scale_shape
    assert decode_comfy_quant(out["blk.0.fc.comfy_quant"])["format"] == fmt


def test_legacy_axiswise_is_explicit_opt_in():
    s = quantized()
    with pytest.warns(NonNativeFormatWarning, match="int8_axiswise"):
        out = layer_tensors(s, legacy_axiswise=True)
    assert tuple(out["blk.0.fc.weight_scale"].shape) == (8,)
    assert decode_comfy_quant(out["blk.0.fc.comfy_quant"]) == {"format": "int8_axiswise"}
    assert torch.equal(out["blk.0.fc.weight_scale"], s.scale.reshape(8))


def test_legacy_non_comfy_layout():
    with pytest.warns(NonNativeFormatWarning, match="non-comfy") as rec:
        out = layer_tensors(quantized(gran=PerRow()), comfy=False)
    assert len(rec) == 1
    assert list(out) == ["blk.0.fc.weight", "blk.0.fc.scale_weight"]
    assert tuple(out["blk.0.fc.scale_weight"].shape) == (8, 1)
    with pytest.warns(NonNativeFormatWarning):
        out = layer_tensors(quantized(gran=PerTensor()), comfy=False)
    assert tuple(out["blk.0.fc.scale_weight"].shape) == ()


def test_fp16_layer():
    s = fp16_cast(LayerState.from_weight("fc", torch.randn(3, 4, generator=torch.Generator().manual_seed(1)),
                                         bias=torch.ones(3)))
    out = layer_tensors(s)
    assert list(out) == ["fc.weight", "fc.bias"]
    assert out["fc.weight"].dtype == torch.float16 and out["fc.bias"].dtype == torch.float32


def test_convrot_and_fpmm_fields_reach_the_tensor():
    s = attrs.evolve(quantized(k=32), basis=ConvRot(16))
    out = layer_tensors(s, full_precision_matrix_mult=True)
    assert decode_comfy_quant(out["blk.0.fc.comfy_quant"]) == {
        "format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 16, "full_precision_matrix_mult": True}
    with pytest.raises(CqError, match="non-comfy format cannot store"):
        layer_tensors(s, comfy=False)
    with pytest.warns(NonNativeFormatWarning, match="full_precision_matrix_mult is not stored"):
        out = layer_tensors(quantized(), comfy=False, full_precision_matrix_mult=True)
    assert "blk.0.fc.comfy_quant" not in out


def test_single_element_tensor_scale_normalised_to_0d():
    s = quantized(gran=PerTensor())
    out = layer_tensors(attrs.evolve(s, scale=s.scale.reshape(1)))
    assert tuple(out["blk.0.fc.weight_scale"].shape) == ()


@pytest.mark.parametrize("change, match", [
    (lambda s: attrs.evolve(s, codes=None), "needs codes and scales"),
    (lambda s: attrs.evolve(s, scale=None), "needs codes and scales"),
    (lambda s: attrs.evolve(s, codes=s.codes.to(torch.int16)), "codes must be int8"),
    (lambda s: attrs.evolve(s, scale=s.scale.reshape(-1)), "needs \\[8, 1\\]"),
    (lambda s: attrs.evolve(s, scale=s.scale.expand(8, 2)), "needs \\[8, 1\\]"),
    (lambda s: attrs.evolve(s, scale=torch.where(torch.arange(8)[:, None] == 3, 0.0, s.scale)),
     "not finite and positive"),
    (lambda s: attrs.evolve(s, scale=s.scale * float("nan")), "8 of 8 scales"),
    (lambda s: attrs.evolve(s, scale=-s.scale), "not finite and positive"),
    (lambda s: attrs.evolve(s, format="int8_weird"), "cannot write format"),
])
def test_refusals_name_the_layer(change, match):
    with pytest.raises(CqError, match=match) as info:
        layer_tensors(change(quantized()))
    assert "blk.0.fc" in str(info.value)


def test_layer_tensors_does_not_mutate_state():
    s = quantized(bias=True)
    codes, scale, bias, weight = s.codes.clone(), s.scale.clone(), s.bias.clone(), s.weight.clone()
    layer_tensors(s)
    assert torch.equal(s.codes, codes) and torch.equal(s.scale, scale)
    assert torch.equal(s.bias, bias) and torch.equal(s.weight, weight)
