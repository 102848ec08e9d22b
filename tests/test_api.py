"""Tests for the convert_to_int8 facade (cq.api) and the model-level runner (cq.convert)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors import safe_open

import cq
from cq.api import FACADE_PARAMETERS, convert_to_int8
from cq.options import OPTIONS, REQUIRED
from tests.model_fixture import LINEAR_KEYS, file_digest, make_model_tensors

BASE = dict(comfy_quant=True, filter_flags={}, calib_samples=64, seed=0)


def _load(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def test_signature_matches_the_reference_exactly():
    params = list(inspect.signature(convert_to_int8).parameters.values())
    named = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert len(named) == 50 and params[-1].kind is inspect.Parameter.VAR_KEYWORD
    assert [p.name for p in named] == list(FACADE_PARAMETERS)  # the one option table covers every name
    for p in named:
        expected = FACADE_PARAMETERS[p.name].default
        assert (p.default is inspect.Parameter.empty) == (expected is REQUIRED), p.name
        if p.default is not inspect.Parameter.empty:
            assert p.default == expected, p.name


def test_default_conversion_is_comfy_native_rows(model_file, tmp_path):
    out = tmp_path / "out.safetensors"
    before = file_digest(model_file)
    report = convert_to_int8(str(model_file), str(out), **BASE)
    assert file_digest(model_file) == before  # input untouched
    tensors, meta = _load(out)
    src = make_model_tensors()
    assert meta["modelspec.title"] == "tiny dit" and "_quantization_metadata" not in meta
    quantized = {r.name for r in report.quantized}
    assert quantized == {k[: -len(".weight")] for k in LINEAR_KEYS}
    for stem in quantized:
        w = src[stem + ".weight"]
        assert tensors[stem + ".weight"].dtype == torch.int8
        scale = tensors[stem + ".weight_scale"]
        assert scale.dtype == torch.float32 and tuple(scale.shape) == (w.shape[0], 1)
        assert json.loads(bytes(tensors[stem + ".comfy_quant"].tolist())) == {"format": "int8_tensorwise"}
        deq = tensors[stem + ".weight"].float() * scale
        rel = float((deq - w.float()).norm() / w.float().norm())
        assert rel < 0.012  # per-row INT8 on Gaussian weights: ~0.0076 (comfyui-format.md §1.6)
    # everything else copied bit-exactly, in its own dtype
    for key, t in src.items():
        if key in LINEAR_KEYS:
            continue
        assert tensors[key].dtype == t.dtype and torch.equal(tensors[key], t), key
    r = report.quantized[0]
    assert {"sqnr_db", "mse", "w8a8", "rel_out_x"} <= set(r.metrics) and r.scale_shape[1] == 1
    assert "layers quantized" in report.table()


def test_scaling_modes_and_metadata(model_file, tmp_path):
    out = tmp_path / "t.safetensors"
    convert_to_int8(str(model_file), str(out), save_quant_metadata=True, scaling_mode="tensor", **BASE)
    tensors, meta = _load(out)
    layers = json.loads(meta["_quantization_metadata"])["layers"]
    assert set(layers) == {k[: -len(".weight")] for k in LINEAR_KEYS}
    for stem, entry in layers.items():
        assert json.loads(bytes(tensors[stem + ".comfy_quant"].tolist())) == entry
        assert tensors[stem + ".weight_scale"].shape == ()


def test_block_mode_warns_and_falls_back_on_untileable(model_file, tmp_path):
    out = tmp_path / "b.safetensors"
    with pytest.warns(UserWarning, match="custom node"):
        report = convert_to_int8(str(model_file), str(out), scaling_mode="block", block_size=64, **BASE)
    by = {r.name: r for r in report.quantized}
    assert by["blocks.0.attn.proj"].format == "int8_blockwise" and by["blocks.0.attn.proj"].scale_shape == (1, 1)
    assert by["blocks.0.mlp.fc1"].format == "int8_tensorwise"  # 96 rows do not tile by 64
    assert any("per-row" in n for n in by["blocks.0.mlp.fc1"].notes)
    assert any("custom node" in n for n in report.notes)


def test_fp16_target(model_file, tmp_path):
    out = tmp_path / "h.safetensors"
    convert_to_int8(str(model_file), str(out), fp16=True, **BASE)
    tensors, _ = _load(out)
    assert tensors["blocks.0.attn.proj.weight"].dtype == torch.float16
    assert "blocks.0.attn.proj.weight_scale" not in tensors and "blocks.0.attn.proj.comfy_quant" not in tensors


def test_legacy_format(model_file, tmp_path):
    out = tmp_path / "l.safetensors"
    with pytest.warns(UserWarning, match="ComfyUI"):
        convert_to_int8(str(model_file), str(out), **{**BASE, "comfy_quant": False}, include_input_scale=True)
    tensors, _ = _load(out)
    assert "blocks.0.attn.proj.scale_weight" in tensors and "blocks.0.attn.proj.comfy_quant" not in tensors
    assert torch.equal(tensors["blocks.0.attn.proj.scale_input"], torch.ones(64, 1))


def test_exclude_and_presets(model_file, tmp_path):
    out = tmp_path / "e.safetensors"
    report = convert_to_int8(str(model_file), str(out), exclude_layers=r"mlp\.fc2", **BASE)
    assert "blocks.0.mlp.fc2" not in {r.name for r in report.quantized}
    tensors, _ = _load(out)
    assert tensors["blocks.0.mlp.fc2.weight"].dtype == torch.float32


def test_every_option_row_has_a_known_destination():
    kinds = {o.kind for o in OPTIONS}
    assert kinds <= {"file", "config", "selection", "recipe", "gptq", "quip", "lora", "learned", "report", "cli", "noop"}
    assert all(o.why for o in OPTIONS if o.kind == "noop")  # an accepted no-op always says why


@pytest.mark.parametrize("extra, match", [
    (dict(smoothquant=True), "smoothquant needs calibration data"),
    (dict(smoothquant_alpha=0.7), "needs smoothquant=True"),
    (dict(num_iter=10), "optimizer 'original', 'adamw' or 'radam'"),
    (dict(lr=0.1, optimizer="gptq"), "optimizer 'original', 'adamw' or 'radam'"),
])
def test_options_that_need_another_option_are_refused_before_reading(model_file, tmp_path, extra, match):
    out = tmp_path / "x.safetensors"
    with pytest.raises(cq.ConfigError, match=match):
        convert_to_int8(str(model_file), str(out), **BASE, **extra)
    assert not out.exists()


def test_learned_rounding_optimizers_run_from_the_facade(model_file, tmp_path):
    out = tmp_path / "x.safetensors"
    report = convert_to_int8(str(model_file), str(out), **BASE, optimizer="adamw", num_iter=5)
    assert {r.recipe for r in report.quantized} == {"LearnedRound"}
    assert any("cannot beat round-to-nearest" in n or "data-free" in n for n in report.notes + sum(
        (r.notes for r in report.quantized), ()))


def test_unknown_kwarg_is_a_type_error(model_file, tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword"):
        convert_to_int8(str(model_file), str(tmp_path / "o.safetensors"), **BASE, bogus=1)


def test_nan_weight_fails_cleanly(tmp_path):
    from safetensors.torch import save_file

    t = make_model_tensors()
    t["blocks.0.mlp.fc2.weight"][3, 4] = float("nan")
    src = tmp_path / "nan.safetensors"
    save_file(t, str(src))
    out = tmp_path / "o.safetensors"
    with pytest.raises(cq.NonFiniteWeightError, match="blocks.0.mlp.fc2"):
        convert_to_int8(str(src), str(out), **BASE)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name not in ("nan.safetensors",)]


def test_output_equal_to_input_is_refused(model_file):
    before = file_digest(model_file)
    with pytest.raises(cq.CqError, match="same file"):
        convert_to_int8(str(model_file), str(model_file), **BASE)
    assert file_digest(model_file) == before


def test_files_load_in_comfy_kitchen(model_file, tmp_path):
    from cq.io import check_with_comfy_kitchen, validate_comfy_file

    out = tmp_path / "ck.safetensors"
    convert_to_int8(str(model_file), str(out), save_quant_metadata=True, **BASE)
    assert validate_comfy_file(str(out)) == []
    src = make_model_tensors()
    originals = {k[: -len(".weight")]: src[k] for k in LINEAR_KEYS}
    results = check_with_comfy_kitchen(str(out), originals)
    assert set(results) == set(originals)
    # Quality against the float original, not parity: the data are seeded and dequantize is elementwise,
    # so these do not depend on the CPU. Per-row INT8 rounds each entry to a step s = max|w_row|/127,
    # a uniform error of RMS s/√12: relative ≈ √(2·ln 2K)/(127·√12) ≈ 0.008 for Gaussian rows of a few
    # hundred entries; 0.012 allows row maxima up to 5.3σ. The W8A8 forward adds the same per-token
    # error of the activations (≈ 0.008) and bf16 rounding of x and y (2⁻⁸/√3 each): ≈ 0.012 in all,
    # 0.05 leaves room for the fixture's odd shapes; a wrong scale or layout gives ≳ 0.1.
    for name, r in results.items():
        assert r["dequant_rel_err"] < 0.012, name
        assert r["forward_rel_err"] < 0.05, name
