"""A LoRA merged by cq, then quantized and written, loads through comfy-kitchen as ComfyUI would,
and carries the LoRA: the dequantized weight is the ComfyUI-merged weight up to int8 rounding."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("comfy_kitchen")

from cq.io import (  # noqa: E402
    QUANT_METADATA_KEY,
    SafetensorsWriter,
    UnifiedSafetensorsLoader,
    comfy_quant_entry,
    layer_tensors,
    quantization_metadata,
)
from cq.io.comfy_kitchen_check import check_with_comfy_kitchen  # noqa: E402
from cq.io.lora_file import lora_file_from_tensors  # noqa: E402
from cq.lora_merge import plan_lora_merge  # noqa: E402
from cq.model import DictView  # noqa: E402
from cq.state import LayerState, PerRow  # noqa: E402
from cq.transforms import ScaleConfig, absmax_scale, round_to_nearest  # noqa: E402
from tests import lora_comfy_reference as ref  # noqa: E402
from tests.float_bounds import gamma  # noqa: E402

H = 64
P = "model.diffusion_model."


def _r(*shape, seed, scale):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_merged_then_quantized_file_loads_in_comfy_kitchen_with_the_lora_in_it(tmp_path):
    base = {P + "img_in.weight": _r(H, 16, seed=0, scale=0.02).bfloat16(),
            P + "double_blocks.0.img_attn.qkv.weight": _r(3 * H, H, seed=1, scale=0.02).bfloat16(),
            P + "double_blocks.0.img_attn.qkv.bias": _r(3 * H, seed=2, scale=0.01).bfloat16(),
            P + "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(H).bfloat16()}
    # a LoRA as large as the weight it patches (B·A ~ W), so that a missing merge shows
    groups = {"transformer.transformer_blocks.0.attn.to_v": {".lora_B.weight": _r(H, 4, seed=3, scale=0.1),
                                                             ".lora_A.weight": _r(4, H, seed=4, scale=0.1),
                                                             ".diff_b": _r(H, seed=5, scale=0.01)},
              "lora_unet_img_in": {".lora_up.weight": _r(H, 2, seed=6, scale=0.1),
                                   ".lora_down.weight": _r(2, 16, seed=7, scale=0.1), ".alpha": torch.tensor(1.0)},
              "diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale": {".diff": _r(H, seed=8, scale=0.1)}}
    lora = lora_file_from_tensors({p + s: t for p, g in groups.items() for s, t in g.items()}, name="l.safetensors")
    edits = plan_lora_merge(DictView(base), [lora], scale=0.9)

    qkv, bias, img_in, norm = (P + "double_blocks.0.img_attn.qkv.weight", P + "double_blocks.0.img_attn.qkv.bias",
                               P + "img_in.weight", P + "double_blocks.0.img_attn.norm.query_norm.scale")
    want = {qkv: ref.patch(base[qkv], groups["transformer.transformer_blocks.0.attn.to_v"], 0.9, (0, 2 * H, H)),
            bias: ref.bias_patch(base[bias], groups["transformer.transformer_blocks.0.attn.to_v"][".diff_b"], 0.9,
                                 (0, 2 * H, H)),
            img_in: ref.patch(base[img_in], groups["lora_unet_img_in"], 0.9),
            norm: ref.patch(base[norm], groups["diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale"], 0.9)}

    # the runner's order: edits on the float32 tensor, then the layer's recipe (quantize or keep)
    states = []
    for key in (qkv, img_in):
        stem = key[: -len(".weight")]
        b = base.get(stem + ".bias")
        s = LayerState.from_weight(stem, base[key].float(),
                                   bias=None if b is None else edits.apply(stem + ".bias", b))
        s = edits.apply_state(s, key)
        states.append(round_to_nearest(absmax_scale(s, cfg=ScaleConfig(PerRow()))))
    kept = edits.apply(norm, base[norm]).to(torch.bfloat16)
    path = tmp_path / "merged_int8.safetensors"
    with SafetensorsWriter(path, metadata={QUANT_METADATA_KEY: quantization_metadata(
            {s.name: comfy_quant_entry(s) for s in states})}) as w:
        for s in states:
            for k, t in layer_tensors(s).items():
                w.add(k, t)
        w.add(norm, kept)

    report = check_with_comfy_kitchen(path, {qkv: want[qkv], img_in: want[img_in]})
    unmerged = check_with_comfy_kitchen(path, {qkv: base[qkv].double(), img_in: base[img_in].double()})
    for key in (qkv, img_in):
        layer = key[: -len(".weight")]
        assert report[layer]["finite"] and report[layer]["format"] == "int8_tensorwise"
        # per-row int8 of a Gaussian-like row: ≈ 0.5 % relative error; the LoRA changes the weight by far more
        assert report[layer]["dequant_rel_err"] < 0.01
        assert unmerged[layer]["dequant_rel_err"] > 10 * report[layer]["dequant_rel_err"]
    with UnifiedSafetensorsLoader(path) as f:
        # the merged bias as the stage returns it (float32): b + s·Δb with s rounded to float32, one
        # product and one sum rounding: ≤ γ₃·(|b| + |s·Δb|) elementwise against the float64 reference
        # (entries outside the patched slice are b itself, exact). A wrong strength or slice moves
        # entries by ~|s·Δb| ≈ 1e-2, ~10⁵ times that.
        b0 = base[bias].double()
        tol = gamma(3) * (b0.abs() + (want[bias] - b0).abs())
        assert bool(((f.get_tensor(bias).double() - want[bias]).abs() <= tol).all())
        assert torch.equal(f.get_tensor(norm), want[norm].to(torch.bfloat16))
