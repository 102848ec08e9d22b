"""cq.io.fp8_inputs: every stored fp8/int8 layout decodes to the float32 value ComfyUI computes."""

from __future__ import annotations

import pytest
import torch

from cq.errors import InputError
from cq.io import UnifiedSafetensorsLoader, encode_comfy_quant, layer_tensors, quantization_metadata
from cq.io.comfy import QUANT_METADATA_KEY
from cq.io.comfy_fp8 import fp8_layer_tensors
from cq.io.fp8_inputs import (RequantizeWarning, decode_stored, find_stored_layers, passthrough_tensors,
                              plan_stored_inputs, stored_input_edits)
from cq.model import DictView, LoaderView
from cq.state import LayerState, PerBlock, PerGroup, PerRow
from cq.transforms import ScaleConfig, absmax_scale, reconstruct, round_to_nearest
from cq.transforms.convrot import convrot
from cq.transforms.fp8 import fp8_pipeline


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
    # the same map as reconstruct (codes·scale, then the inverse rotation): float32 rounding only
    assert torch.allclose(d.weight, reconstruct(s), atol=1e-6 * float(w.abs().max()))
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


def test_model_edits_decode_what_the_runner_reads_and_report_it():
    from cq.model import run_model_transforms

    w = _w(seed=8)
    codes, scale, value = _fp8_codes(w)
    s8 = round_to_nearest(absmax_scale(convrot(LayerState.from_weight("r", _w(8, 64, seed=9))), cfg=ScaleConfig(PerRow())))
    v = DictView({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "a.weight": codes,
                  "a.scale_weight": scale, "b.weight": w, **layer_tensors(s8)})
    edits = run_model_transforms(v, [stored_input_edits])
    # the runner reads tensor.float() (the codes) and applies the edit stages: the decoded value comes out
    assert torch.equal(edits.apply("a.weight", v.tensor("a.weight").float()), value)
    assert "b.weight" not in edits and "r.weight" not in edits  # float weights untouched, int8 kept
    rep = edits.report["stored_inputs"]
    assert rep["from_fp8"] == ["a"] and rep["kept_int8"] == ["r"] and "scaled_fp8" in rep["drop"]
    assert set(rep["copy"]) == {"r.weight", "r.weight_scale", "r.comfy_quant"}
    assert rep["decoded"] == {"a": "decoded from float8_e4m3fn (scaled_fp8)"} and edits.warnings == ()
    st = edits.apply_state(LayerState.from_weight("a.weight", v.tensor("a.weight").float()), "a.weight")
    assert st.notes == ("decoded from float8_e4m3fn (scaled_fp8)",) and torch.equal(st.original, value)
    re = stored_input_edits(v, requantize_int8=True)
    assert len(re.warnings) == 1 and "second one" in re.warnings[0]
    assert re.report["stored_inputs"]["decoded"]["r"] == "decoded from int8_tensorwise (comfy_quant, convrot 64 undone)"
    assert torch.allclose(re.apply("r.weight", v.tensor("r.weight").float()), reconstruct(s8), atol=1e-7)


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
