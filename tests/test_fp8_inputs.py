"""cq.io.fp8_inputs: every stored fp8/int8 layout decodes to the float32 value ComfyUI computes."""

from __future__ import annotations

import pytest
import torch

from cq.errors import InputError
from cq.io import UnifiedSafetensorsLoader, encode_comfy_quant, layer_tensors, quantization_metadata
from cq.io.comfy import QUANT_METADATA_KEY
from cq.io.comfy_fp8 import fp8_layer_tensors
from cq.io.fp8_inputs import (RequantizeWarning, decode_stored, find_stored_layers, passthrough_tensors,
                              plan_stored_inputs, DecodedView)
from cq.model import DictView, LoaderView
from cq.state import LayerState, PerBlock, PerGroup, PerRow
from cq.transforms import ScaleConfig, absmax_scale, reconstruct, round_to_nearest
from cq.transforms.convrot import convrot
from cq.transforms.fp8 import fp8_pipeline
from tests.float_bounds import group_rotation_gap


def _w(n=16, k=32, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def _fp8_codes(w):
    s = fp8_pipeline()(LayerState.from_weight("x", w))
    return s.codes, s.scale, reconstruct(s)


def test_legacy_scaled_fp8_with_marker_and_scale_input():
    codes, scale, value = _fp8_codes(_w())
    v = DictView({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "a.weight": codes,
                  "a.scale_weight": scale.reshape(1), "a.scale_input": torch.tensor(1.0), "a.bias": torch.zeros(16),
                  "n.weight": torch.ones(16)})
    layers = find_stored_layers(v)
    assert list(layers) == ["a.weight"] and layers["a.weight"].layout == "scaled_fp8"
    d = decode_stored(v, layers["a.weight"])
    assert d.weight.dtype == torch.float32 and torch.equal(d.weight, value)
    assert set(d.consumed) == {"a.weight", "a.scale_weight", "a.scale_input"}
    plan = plan_stored_inputs(v)
    assert plan.drop == {"a.scale_weight", "a.scale_input", "scaled_fp8"} and plan.from_fp8 == ("a",)


def test_comfy_fp8_roundtrip_exact_tensor_and_header_only(tmp_path):
    w = _w(seed=1)
    s = fp8_pipeline()(LayerState.from_weight("m.a", w, bias=torch.zeros(16)))
    tensors = fp8_layer_tensors(s)
    # the header-only variant: no .comfy_quant tensor, the header carries the config (ComfyUI accepts both)
    # (cq's own writer always writes both, so this file is written with plain safetensors, like other tools do)
    from safetensors.torch import save_file

    path = tmp_path / "fp8.safetensors"
    save_file({k: t for k, t in tensors.items() if not k.endswith(".comfy_quant")}, str(path),
              metadata={QUANT_METADATA_KEY: quantization_metadata({"m.a": {"format": "float8_e4m3fn"}})})
    for view in (DictView(tensors), LoaderView(UnifiedSafetensorsLoader(str(path)))):
        layer = find_stored_layers(view)["m.a.weight"]
        assert (layer.layout, layer.format, layer.scale_key) == ("comfy_quant", "float8_e4m3fn", "m.a.weight_scale")
        assert torch.equal(decode_stored(view, layer).weight, reconstruct(s))


def test_scale_weight_without_marker_bf16_scale_and_unscaled_e5m2():
    w = _w(seed=2)
    codes, scale, _ = _fp8_codes(w)
    e5 = (w * 100).to(torch.float8_e5m2)
    v = DictView({"a.weight": codes, "a.scale_weight": scale.to(torch.bfloat16), "b.weight": e5})
    layers = find_stored_layers(v)
    assert layers["a.weight"].layout == "scale_weight" and layers["b.weight"].layout == "unscaled"
    assert layers["b.weight"].format == "float8_e5m2"
    a = decode_stored(v, layers["a.weight"]).weight
    assert torch.equal(a, codes.float() * scale.to(torch.bfloat16).float())
    assert torch.equal(decode_stored(v, layers["b.weight"]).weight, e5.float())
    assert any("scale 1" in n for n in plan_stored_inputs(v).notes)


def _int8_file_tensors(state):
    return layer_tensors(state)


def test_int8_kept_by_default_requantized_with_warning():
    s = round_to_nearest(absmax_scale(LayerState.from_weight("q", _w(seed=3)), cfg=ScaleConfig(PerRow())))
    v = DictView(_int8_file_tensors(s))
    plan = plan_stored_inputs(v)
    assert list(plan.keep) == ["q.weight"] and not plan.decode and not plan.from_fp8
    assert set(plan.keys_to_copy()) == {"q.weight", "q.weight_scale", "q.comfy_quant"}
    with pytest.warns(RequantizeWarning, match="second one"):
        plan = plan_stored_inputs(v, requantize_int8=True)
    assert list(plan.decode) == ["q.weight"]
    assert torch.equal(decode_stored(v, plan.decode["q.weight"]).weight, reconstruct(s))


def test_int8_convrot_decodes_to_original_basis():
    w = _w(8, 64, seed=4)
    s = round_to_nearest(absmax_scale(convrot(LayerState.from_weight("r", w)), cfg=ScaleConfig(PerRow())))
    v = DictView(_int8_file_tensors(s))
    d = decode_stored(v, find_stored_layers(v)["r.weight"])
    assert "convrot" in d.note
    # the same map as reconstruct (float32 codes·scale, then the inverse rotation): two float32
    # evaluations of ŵ·Rᵀ, within √G·eps·Σ_group|ŵ| elementwise (tests.float_bounds.group_rotation_gap)
    wq = s.codes.float() * s.scale
    gap = (d.weight.double() - reconstruct(s).double()).abs()
    assert bool((gap <= group_rotation_gap(wq, s.basis.groupsize)).all())
    assert float((d.weight - w).norm() / w.norm()) < 0.02


@pytest.mark.parametrize("gran", [PerBlock(8), PerGroup(8)])
def test_fork_int8_blockwise_layouts_decode(gran):
    s = round_to_nearest(absmax_scale(LayerState.from_weight("b", _w(16, 32, seed=5)), cfg=ScaleConfig(gran)))
    with pytest.warns(UserWarning, match="vanilla ComfyUI"):
        tensors = layer_tensors(s)
    v = DictView(tensors)
    layer = find_stored_layers(v)["b.weight"]
    assert layer.format == "int8_blockwise"
    with pytest.warns(RequantizeWarning):
        plan_stored_inputs(v, requantize_int8=True)
    assert torch.equal(decode_stored(v, layer).weight, reconstruct(s))


def test_undecodable_and_broken_inputs_raise():
    v = DictView({"a.weight": torch.zeros(4, 8, dtype=torch.uint8), "a.comfy_quant": encode_comfy_quant({"format": "nvfp4"})})
    with pytest.raises(InputError, match="nvfp4"):
        find_stored_layers(v)
    v = DictView({"a.comfy_quant": encode_comfy_quant({"format": "float8_e4m3fn"})})
    with pytest.raises(InputError, match="no a.weight"):
        find_stored_layers(v)
    v = DictView({"a.weight": torch.zeros(4, 8).to(torch.float8_e4m3fn),
                  "a.comfy_quant": encode_comfy_quant({"format": "float8_e4m3fn"})})
    with pytest.raises(InputError, match="Missing"):
        decode_stored(v, find_stored_layers(v)["a.weight"])
    v = DictView({"a.weight": torch.zeros(4, 8).to(torch.float8_e4m3fn), "a.scale_weight": torch.ones(3)})
    with pytest.raises(InputError, match="does not fit"):
        decode_stored(v, find_stored_layers(v)["a.weight"])


def test_decoded_view_is_what_the_runner_reads():
    w = _w(seed=8)
    codes, scale, value = _fp8_codes(w)
    s8 = round_to_nearest(absmax_scale(convrot(LayerState.from_weight("r", _w(8, 64, seed=9))), cfg=ScaleConfig(PerRow())))
    v = DictView({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "a.weight": codes,
                  "a.scale_weight": scale, "b.weight": w, **layer_tensors(s8)})
    d = DecodedView(v, plan_stored_inputs(v))
    assert torch.equal(d.tensor("a.weight"), value) and d.dtype("a.weight") == torch.float32
    assert "a.scale_weight" not in d.keys() and "scaled_fp8" not in d.keys()  # consumed companions are hidden
    assert d.tensor("b.weight") is not None and d.stored("b.weight") is None  # float weights untouched
    assert d.dtype("r.weight") == torch.int8 and {"r.weight_scale", "r.comfy_quant"} <= set(d.keys())  # int8 kept
    assert d.note("a.weight") == "decoded from float8_e4m3fn (scaled_fp8)"
    with pytest.warns(RequantizeWarning, match="second one"):
        re = DecodedView(v, plan_stored_inputs(v, requantize_int8=True))
    assert re.note("r.weight") == "decoded from int8_tensorwise (comfy_quant, convrot 64 undone)"
    gap = (re.tensor("r.weight").double() - reconstruct(s8).double()).abs()  # as in the convrot test above
    assert bool((gap <= group_rotation_gap(s8.codes.float() * s8.scale, s8.basis.groupsize)).all())
    assert "r.weight_scale" not in re.keys()


def test_fp8_and_int8_inputs_through_the_runner(tmp_path):
    """An fp8-only model becomes INT8; an int8 layer is copied unchanged; the report names the fp8 layers."""
    from safetensors.torch import save_file

    from cq import ConvertConfig, convert_file
    from cq.io import check_with_comfy_kitchen, validate_comfy_file

    w = _w(seed=12)
    codes, scale, value = _fp8_codes(w)
    s8 = round_to_nearest(absmax_scale(LayerState.from_weight("r", _w(8, 64, seed=13))))
    src = tmp_path / "fp8.safetensors"
    save_file({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "a.weight": codes,
               "a.scale_weight": scale, **layer_tensors(s8)}, str(src))
    out = tmp_path / "o.safetensors"
    report = convert_file(str(src), str(out), ConvertConfig(save_quant_metadata=True))
    assert report.model["stored_inputs"] == {"from_fp8": ["a"], "kept_int8": ["r"]}
    assert {r.name: r.source for r in report.quantized} == {"a": "decoded from float8_e4m3fn (scaled_fp8)"}
    with UnifiedSafetensorsLoader(str(out)) as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    assert "a.scale_weight" not in t and "scaled_fp8" not in t and t["a.weight"].dtype == torch.int8
    assert torch.equal(t["r.weight"], s8.codes) and torch.equal(t["r.weight_scale"], s8.scale)
    assert validate_comfy_file(str(out)) == []
    res = check_with_comfy_kitchen(str(out), {"a": value, "r": s8.original})
    assert res["a"]["dequant_rel_err"] < 0.012 and res["r"]["dequant_rel_err"] < 0.012


def test_passthrough_keeps_fp8_codes_in_native_layout(tmp_path):
    from cq.io import validate_comfy_file, write_safetensors

    codes, scale, value = _fp8_codes(_w(seed=10))
    v = DictView({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "a.weight": codes,
                  "a.scale_weight": scale.reshape(1), "a.scale_input": torch.tensor([0.02])})
    out = passthrough_tensors(v, find_stored_layers(v)["a.weight"])
    assert torch.equal(out["a.weight"].view(torch.uint8), codes.view(torch.uint8))
    assert out["a.input_scale"].shape == () and out["a.weight_scale"].dtype == torch.float32
    write_safetensors(tmp_path / "p.safetensors", out)
    assert validate_comfy_file(tmp_path / "p.safetensors") == []
    s8 = round_to_nearest(absmax_scale(LayerState.from_weight("q", _w(seed=11))))
    v8 = DictView(layer_tensors(s8))
    with pytest.raises(InputError, match="keys_to_copy"):
        passthrough_tensors(v8, find_stored_layers(v8)["q.weight"])
