"""LoRA merging as ComfyUI computes it: key layouts, every patch format, errors, report, dampening.

Each test states by hand which base tensor (and slice) a LoRA name must patch, and compares cq's
float32 merge with ``tests.lora_comfy_reference`` (an independent float64 re-derivation of ComfyUI's
arithmetic). Tolerance: the merge runs in float32 like ComfyUI's, so the deviation from float64 is
float32 rounding of ``W + s·Δ`` (eps = 1.2e-7 relative) plus accumulation over at most 64 products
per entry (≤ 64·eps ≈ 7.6e-6 relative to the term sizes); ``1e-5 · (|W|max + |ΔW|max)`` bounds both on
any x86 CPU.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from cq.errors import ConfigError, InputError
from cq.io import UnifiedSafetensorsLoader
from cq.io.lora_file import lora_file_from_tensors, read_lora_file
from cq.lora import comfy_key_map
from cq.lora_merge import LoraMergeConfig, lora_config_from_options, lora_rows_for, merge_loras, plan_lora_merge
from cq.model import DictView, LoaderView
from tests import lora_comfy_reference as ref

H = 8  # hidden size of the tiny models


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=_g(seed)) * scale).to(dtype)


def _close(got, want, w0):
    """max |got − want| against the bound of the module docstring; returns the relative deviation."""
    got, want, w0 = got.double(), want.double(), w0.double()
    delta = (want - w0).abs().max().item()
    err = (got - want).abs().max().item()
    bound = 1e-5 * (w0.abs().max().item() + delta) + 1e-30
    assert err <= bound, f"deviation {err:.3g} > bound {bound:.3g}"
    return err / max(delta, 1e-30)


# ---------------------------------------------------------------------------------------------
# tiny base models, one per key layout


def flux_base(prefix="", flux2=False, dtype=torch.bfloat16):
    t = {
        "img_in.weight": (H, 4), "img_in.bias": (H,),
        "double_blocks.0.img_attn.qkv.weight": (3 * H, H), "double_blocks.0.img_attn.qkv.bias": (3 * H,),
        "double_blocks.0.txt_attn.qkv.weight": (3 * H, H), "double_blocks.0.img_attn.proj.weight": (H, H),
        "double_blocks.0.img_mlp.0.weight": (4 * H, H), "double_blocks.0.img_attn.norm.query_norm.scale": (H // 2,),
        "single_blocks.0.linear1.weight": ((9 if flux2 else 7) * H, H), "single_blocks.0.linear1.bias": (7 * H,),
        "single_blocks.0.linear2.weight": (H, 5 * H),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.adaLN_modulation.1.bias": (2 * H,),
        "final_layer.linear.weight": (4, H),
    }
    if flux2:
        del t["single_blocks.0.linear1.bias"], t["img_in.bias"]
        t["double_stream_modulation_img.lin.weight"] = (6 * H, H)
    else:
        t["double_blocks.0.img_mod.lin.weight"] = (6 * H, H)
    return {prefix + k: _randn(*s, seed=i, dtype=dtype) for i, (k, s) in enumerate(t.items())}


def sd3_base(prefix="model.diffusion_model."):
    h = 128  # ComfyUI reads depth = hidden // 64: two blocks
    t = {"x_embedder.proj.weight": (h, 4, 2, 2), "joint_blocks.0.x_block.attn.qkv.weight": (3 * h, h),
         "joint_blocks.0.context_block.attn.qkv.weight": (3 * h, h), "joint_blocks.0.x_block.mlp.fc1.weight": (16, h),
         "joint_blocks.1.x_block.attn.qkv.weight": (3 * h, h),
         "joint_blocks.1.context_block.adaLN_modulation.1.weight": (2 * h, h),
         "final_layer.adaLN_modulation.1.weight": (2 * h, h), "first_stage_model.x": (2,)}
    return {(k if k.startswith("first") else prefix + k): _randn(*s, seed=50 + i, dtype=torch.float16)
            for i, (k, s) in enumerate(t.items())}


def wan_base():
    t = {"patch_embedding.weight": (H, 4, 1, 2, 2), "blocks.0.self_attn.q.weight": (H, H),
         "blocks.0.self_attn.q.bias": (H,), "blocks.0.cross_attn.k.weight": (H, H), "blocks.0.ffn.0.weight": (4 * H, H),
         "blocks.0.modulation": (1, 6, H)}
    return {"diffusion_model." + k: _randn(*s, seed=80 + i) for i, (k, s) in enumerate(t.items())}


def qwen_base():
    t = {"img_in.weight": (H, 4), "txt_norm.weight": (H,), "transformer_blocks.0.attn.to_q.weight": (H, H),
         "transformer_blocks.0.attn.to_k.weight": (H, H), "transformer_blocks.0.attn.add_q_proj.weight": (H, H),
         "transformer_blocks.0.img_mlp.net.0.proj.weight": (4 * H, H)}
    return {k: _randn(*s, seed=100 + i, dtype=torch.bfloat16) for i, (k, s) in enumerate(t.items())}


def sdxl_base():
    c = 8
    t = {"input_blocks.0.0.weight": (c, 4, 3, 3), "input_blocks.1.0.in_layers.2.weight": (c, c, 3, 3),
         "input_blocks.2.0.op.weight": (c, c, 3, 3), "input_blocks.3.0.in_layers.2.weight": (2 * c, c, 3, 3),
         "input_blocks.3.1.proj_in.weight": (2 * c, 2 * c),
         "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight": (2 * c, 2 * c),
         "input_blocks.3.1.transformer_blocks.0.attn1.to_k.weight": (2 * c, 2 * c),
         "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": (2 * c, 12),
         "middle_block.1.transformer_blocks.0.attn1.to_q.weight": (2 * c, 2 * c),
         "output_blocks.0.0.in_layers.2.weight": (2 * c, 4 * c, 3, 3),
         "output_blocks.0.1.transformer_blocks.0.attn1.to_q.weight": (2 * c, 2 * c),
         "output_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight": (2 * c, 2 * c),
         "output_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": (2 * c,),
         "output_blocks.1.2.conv.weight": (2 * c, 2 * c, 3, 3), "output_blocks.2.0.in_layers.2.weight": (c, 3 * c, 3, 3),
         "output_blocks.3.0.in_layers.2.weight": (c, 2 * c, 3, 3), "label_emb.0.0.weight": (4 * c, 6)}
    return {"model.diffusion_model." + k: _randn(*s, seed=120 + i, dtype=torch.float16) for i, (k, s) in enumerate(t.items())}


def lora_pair(n, k, r, seed, up=".lora_up.weight", down=".lora_down.weight", alpha=None):
    g = {up: _randn(n, r, seed=seed, scale=0.3), down: _randn(r, k, seed=seed + 1, scale=0.3)}
    if alpha is not None:
        g[".alpha"] = torch.tensor(alpha)
    return g


def _file(groups: dict, name="l.safetensors"):
    return lora_file_from_tensors({p + s: t for p, g in groups.items() for s, t in g.items()}, name=name)


def _merged(base: dict, edits) -> dict:
    return {k: edits.apply(k, v) for k, v in base.items()}


# ---------------------------------------------------------------------------------------------
# key layouts: every trainer spelling lands on the tensor (and rows) ComfyUI patches


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
def test_flux_names_and_fused_slices(prefix):
    base = flux_base(prefix)
    P = prefix
    cases = {  # LoRA prefix: (base key, offset, swap)
        "transformer.transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv.weight", (0, 0, H), False),
        "transformer.transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv.weight", (0, 2 * H, H), False),
        "lora_transformer_transformer_blocks_0_attn_add_k_proj": ("double_blocks.0.txt_attn.qkv.weight", (0, H, H), False),
        "transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn.proj.weight", None, False),  # DiffSynth
        "lycoris_single_transformer_blocks_0_proj_mlp": ("single_blocks.0.linear1.weight", (0, 3 * H, 4 * H), False),
        "transformer.single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1.weight", (0, H, H), False),
        "lora_unet_double_blocks_0_img_mlp_0": ("double_blocks.0.img_mlp.0.weight", None, False),
        "diffusion_model.single_blocks.0.linear2": ("single_blocks.0.linear2.weight", None, False),
        "transformer.norm_out.linear": ("final_layer.adaLN_modulation.1.weight", None, True),
        "transformer.x_embedder": ("img_in.weight", None, False),
    }
    groups, want = {}, {k: v.double() for k, v in base.items()}
    for i, (name, (key, off, swap)) in enumerate(cases.items()):
        shape = tuple(base[P + key].shape)
        n = off[2] if off else shape[0]
        spelling = [(".lora_B.weight", ".lora_A.weight"), (".lora_up.weight", ".lora_down.weight")][i % 2]
        groups[name] = lora_pair(n, shape[1], 2 + i % 3, seed=10 * i, up=spelling[0], down=spelling[1],
                                 alpha=None if i % 3 == 0 else 3.0)
        want[P + key] = ref.patch(want[P + key], groups[name], 0.7, off, swap)
    edits = plan_lora_merge(DictView(base), [_file(groups)], scale=0.7)
    assert edits.report["lora"]["architecture"] == "flux"
    assert edits.report["lora"]["files"][0]["unmatched"] == [] and edits.warnings == ()
    got = _merged(base, edits)
    for k in base:
        _close(got[k], want[k], base[k])
    # untouched tensors are untouched (no stage at all)
    assert P + "final_layer.linear.weight" not in edits.stages


def test_kohya_name_of_norm_out_is_not_swapped_and_linear1_qkv_covers_three_slices():
    base = flux_base()
    groups = {"lora_unet_final_layer_adaLN_modulation_1": lora_pair(2 * H, H, 2, seed=1),
              "diffusion_model.single_blocks.0.linear1_qkv": lora_pair(3 * H, H, 2, seed=3, up=".lora_B",
                                                                        down=".lora_A")}
    got = _merged(base, plan_lora_merge(DictView(base), [_file(groups)]))
    k1, k2 = "final_layer.adaLN_modulation.1.weight", "single_blocks.0.linear1.weight"
    _close(got[k1], ref.patch(base[k1], groups["lora_unet_final_layer_adaLN_modulation_1"]), base[k1])
    _close(got[k2], ref.patch(base[k2], groups["diffusion_model.single_blocks.0.linear1_qkv"], 1.0, (0, 0, 3 * H)),
           base[k2])


def test_flux2_fused_single_block_and_double_block_slices():
    base = flux_base(flux2=True)
    groups = {"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj": lora_pair(9 * H, H, 4, seed=5),
              "transformer.transformer_blocks.0.attn.to_k": lora_pair(H, H, 2, seed=7, up=".lora_B.weight",
                                                                      down=".lora_A.weight")}
    got = _merged(base, plan_lora_merge(DictView(base), [_file(groups)]))
    k1, k2 = "single_blocks.0.linear1.weight", "double_blocks.0.img_attn.qkv.weight"
    _close(got[k1], ref.patch(base[k1], groups["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj"]), base[k1])
    _close(got[k2], ref.patch(base[k2], groups["transformer.transformer_blocks.0.attn.to_k"], 1.0, (0, H, H)), base[k2])


def test_sd3_mmdit_names_slices_and_last_block_swap():
    base = sd3_base()
    P, h = "model.diffusion_model.", 128
    cases = {"transformer.transformer_blocks.0.attn.to_k": ("joint_blocks.0.x_block.attn.qkv.weight", (0, h, h), False),
             "base_model.model.transformer_blocks.0.attn.add_v_proj": ("joint_blocks.0.context_block.attn.qkv.weight",
                                                                      (0, 2 * h, h), False),
             "lora_transformer_transformer_blocks_0_ff_net_0_proj": ("joint_blocks.0.x_block.mlp.fc1.weight", None, False),
             "lycoris_transformer_blocks_1_norm1_context_linear": (
                 "joint_blocks.1.context_block.adaLN_modulation.1.weight", None, True),
             "transformer.norm_out.linear": ("final_layer.adaLN_modulation.1.weight", None, True)}
    groups, want = {}, {}
    for i, (name, (key, off, swap)) in enumerate(cases.items()):
        shape = tuple(base[P + key].shape)
        groups[name] = lora_pair(off[2] if off else shape[0], shape[1], 4, seed=20 + 2 * i, alpha=2.0)
        want[P + key] = ref.patch(want.get(P + key, base[P + key]), groups[name], 1.0, off, swap)
    edits = plan_lora_merge(DictView(base), [_file(groups)])
    assert edits.report["lora"]["architecture"] == "mmdit"
    for k, v in want.items():
        _close(edits.apply(k, base[k]), v, base[k])
    assert "first_stage_model.x" not in edits.stages


def test_wan_generic_names_wan_fun_spelling_and_diffusers_names_unmatched():
    base = wan_base()
    P = "diffusion_model."
    groups = {"diffusion_model.blocks.0.self_attn.q": {**lora_pair(H, H, 2, seed=1, up=".lora_B.weight",
                                                                    down=".lora_A.weight"),
                                                        ".diff_b": _randn(H, seed=3)},
              "lora_unet__blocks_0_cross_attn_k": lora_pair(H, H, 2, seed=4, alpha=1.0),  # Wan-Fun
              "diffusion_model.blocks.0.modulation": {".diff": _randn(1, 6, H, seed=5, scale=0.1)},
              "transformer.blocks.0.ffn.0": lora_pair(4 * H, H, 2, seed=6)}  # ComfyUI maps no diffusers names for Wan
    edits = plan_lora_merge(DictView(base), [_file(groups)])
    assert edits.report["lora"]["architecture"] == "wan"
    k = P + "blocks.0.self_attn.q.weight"
    _close(edits.apply(k, base[k]), ref.patch(base[k], groups["diffusion_model.blocks.0.self_attn.q"]), base[k])
    kb = P + "blocks.0.self_attn.q.bias"
    _close(edits.apply(kb, base[kb]), ref.bias_patch(base[kb], groups["diffusion_model.blocks.0.self_attn.q"][".diff_b"]),
           base[kb])
    kc = P + "blocks.0.cross_attn.k.weight"
    _close(edits.apply(kc, base[kc]), ref.patch(base[kc], groups["lora_unet__blocks_0_cross_attn_k"]), base[kc])
    km = P + "blocks.0.modulation"
    _close(edits.apply(km, base[km]), ref.patch(base[km], groups["diffusion_model.blocks.0.modulation"]), base[km])
    unmatched = edits.report["lora"]["files"][0]["unmatched"]
    assert unmatched == ["transformer.blocks.0.ffn.0.lora_down.weight", "transformer.blocks.0.ffn.0.lora_up.weight"]
    assert len(edits.warnings) == 1 and "2 of 9 tensors match no tensor" in edits.warnings[0]


def test_qwen_image_bare_transformer_and_lycoris_names():
    base = qwen_base()
    groups = {"transformer_blocks.0.attn.to_q": lora_pair(H, H, 2, seed=1, up=".lora_B.default.weight",
                                                          down=".lora_A.default.weight"),
              "transformer.transformer_blocks.0.attn.to_k": lora_pair(H, H, 2, seed=3, up=".lora.up.weight",
                                                                      down=".lora.down.weight", alpha=4.0),
              "lycoris_transformer_blocks_0_attn_add_q_proj": {".lokr_w1": _randn(2, 2, seed=5),
                                                               ".lokr_w2_a": _randn(4, 2, seed=6),
                                                               ".lokr_w2_b": _randn(2, 4, seed=7),
                                                               ".alpha": torch.tensor(1.0)},
              "transformer_blocks.0.img_mlp.net.0.proj": lora_pair(4 * H, H, 3, seed=8, up="_lora.up.weight",
                                                                   down="_lora.down.weight")}
    edits = plan_lora_merge(DictView(base), [_file(groups)])
    assert edits.report["lora"]["architecture"] == "qwen_image"
    for name, key in [("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_q.weight"),
                      ("transformer.transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_k.weight"),
                      ("lycoris_transformer_blocks_0_attn_add_q_proj", "transformer_blocks.0.attn.add_q_proj.weight"),
                      ("transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.img_mlp.net.0.proj.weight")]:
        _close(edits.apply(key, base[key]), ref.patch(base[key], groups[name]), base[key])


def test_z_image_diffusers_names_and_qkv_slices():
    t = {"x_embedder.weight": (H, 16), "cap_embedder.1.weight": (H, 8), "layers.0.attention.qkv.weight": (3 * H, H),
         "layers.0.feed_forward.w1.weight": (3 * H, H), "noise_refiner.0.attention.qkv.weight": (3 * H, H),
         "final_layer.linear.weight": (16, H)}
    base = {"model.diffusion_model." + k: _randn(*s, seed=140 + i, dtype=torch.bfloat16) for i, (k, s) in enumerate(t.items())}
    cases = {"diffusion_model.layers.0.attention.to_k": ("layers.0.attention.qkv.weight", (0, H, H)),
             "transformer.noise_refiner.0.attention.to_v": ("noise_refiner.0.attention.qkv.weight", (0, 2 * H, H)),
             "lycoris_layers_0_feed_forward_w1": ("layers.0.feed_forward.w1.weight", None),
             "all_final_layer.2-1.linear": ("final_layer.linear.weight", None)}
    groups, want = {}, {}
    for i, (name, (key, off)) in enumerate(cases.items()):
        key = "model.diffusion_model." + key
        groups[name] = lora_pair(off[2] if off else base[key].shape[0], H, 2, seed=150 + 2 * i, alpha=1.0)
        want[key] = ref.patch(base[key], groups[name], 1.0, off)
    edits = plan_lora_merge(DictView(base), [_file(groups)])
    assert edits.report["lora"]["architecture"] == "lumina2" and edits.warnings == ()
    for k, v in want.items():
        _close(edits.apply(k, base[k]), v, base[k])


def test_sdxl_native_kohya_diffusers_kohya_old_diffusers_and_conv_locon():
    base = sdxl_base()
    P, c = "model.diffusion_model.", 8
    cases = {
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": "input_blocks.3.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k":
            "input_blocks.3.1.transformer_blocks.0.attn2.to_k",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_k":
            "input_blocks.3.1.transformer_blocks.0.attn1.to_k",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor.to_out":
            "output_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
        "lycoris_mid_block_attentions_0_transformer_blocks_0_attn1_to_q":
            "middle_block.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "output_blocks.0.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_down_blocks_1_attentions_0_proj_in": "input_blocks.3.1.proj_in",
        "lora_unet_add_embedding_linear_1": "label_emb.0.0",
    }
    groups, want = {}, {}
    for i, (name, stem) in enumerate(cases.items()):
        key = P + stem + ".weight"
        n, k = base[key].shape
        spelling = ("_lora.up.weight", "_lora.down.weight") if ".processor." in name else (".lora_up.weight",
                                                                                            ".lora_down.weight")
        groups[name] = lora_pair(n, k, 2, seed=30 + 2 * i, up=spelling[0], down=spelling[1], alpha=1.0)
        want[key] = ref.patch(base[key], groups[name])
    # conv layers: a LoCon (conv down [r, C, 3, 3], up [N, r, 1, 1]) and a Tucker LoCon with lora_mid
    conv = P + "input_blocks.1.0.in_layers.2.weight"
    groups["lora_unet_input_blocks_1_0_in_layers_2"] = {".lora_down.weight": _randn(2, c, 3, 3, seed=60, scale=0.3),
                                                        ".lora_up.weight": _randn(c, 2, 1, 1, seed=61, scale=0.3),
                                                        ".alpha": torch.tensor(1.0)}
    want[conv] = ref.patch(base[conv], groups["lora_unet_input_blocks_1_0_in_layers_2"])
    up_conv = P + "output_blocks.1.2.conv.weight"
    groups["lycoris_up_blocks_0_upsamplers_0_conv"] = {".lora_down.weight": _randn(3, 2 * c, 1, 1, seed=62, scale=0.3),
                                                       ".lora_mid.weight": _randn(3, 3, 3, 3, seed=63, scale=0.3),
                                                       ".lora_up.weight": _randn(2 * c, 3, 1, 1, seed=64, scale=0.3),
                                                       ".alpha": torch.tensor(2.0)}
    want[up_conv] = ref.patch(base[up_conv], groups["lycoris_up_blocks_0_upsamplers_0_conv"])
    edits = plan_lora_merge(DictView(base), [_file(groups)])
    assert edits.report["lora"]["architecture"] == "unet" and edits.warnings == ()
    for k, v in want.items():
        _close(edits.apply(k, base[k]), v, base[k])


def test_key_map_has_only_targets_that_exist_and_keeps_the_file_spelling():
    base = sdxl_base()
    m = comfy_key_map(DictView(base))
    assert all(t.key in base for t in m.targets.values())
    # the downsampler of the last level does not exist in the model, so no name maps to it
    assert "lora_unet_down_blocks_1_downsamplers_0_conv" not in m
    assert m["lora_unet_down_blocks_0_downsamplers_0_conv"].key == "model.diffusion_model.input_blocks.2.0.op.weight"


# ---------------------------------------------------------------------------------------------
# every patch format against the reference


def _formats(n, k):
    """name → a LoRA group for a [n, k] weight, in every format ComfyUI merges."""
    r = 4
    lora = lora_pair(n, k, r, seed=1, alpha=2.0)
    return {
        "lora (no alpha)": lora_pair(n, k, r, seed=3),
        "lora + alpha": lora,
        "lora_A/B no .weight": lora_pair(n, k, r, seed=5, up=".lora_B", down=".lora_A", alpha=8.0),
        "lora_linear_layer": lora_pair(n, k, r, seed=7, up=".lora_linear_layer.up.weight",
                                       down=".lora_linear_layer.down.weight"),
        "loha": {".hada_w1_a": _randn(n, r, seed=9, scale=0.5), ".hada_w1_b": _randn(r, k, seed=10, scale=0.5),
                 ".hada_w2_a": _randn(n, r, seed=11, scale=0.5), ".hada_w2_b": _randn(r, k, seed=12, scale=0.5),
                 ".alpha": torch.tensor(2.0)},
        "lokr full (alpha ignored)": {".lokr_w1": _randn(2, 4, seed=13), ".lokr_w2": _randn(n // 2, k // 4, seed=14),
                                      ".alpha": torch.tensor(3.0)},
        "lokr factorised (alpha/dim)": {".lokr_w1_a": _randn(2, 2, seed=15), ".lokr_w1_b": _randn(2, 4, seed=16),
                                        ".lokr_w2_a": _randn(n // 2, 3, seed=17, scale=0.3),
                                        ".lokr_w2_b": _randn(3, k // 4, seed=18, scale=0.3),
                                        ".alpha": torch.tensor(3.0)},
        "dora": {**lora, ".dora_scale": _randn(1, k, seed=19).abs() + 0.5},
        "diff": {".diff": _randn(n, k, seed=20, scale=0.1)},
        "set_weight": {".set_weight": _randn(n, k, seed=21)},
    }


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("fmt", list(_formats(16, 8)))
def test_every_format_matches_comfyui_arithmetic(fmt, strength):
    base = {"diffusion_model.blocks.0.fc.weight": _randn(16, 8, seed=0, dtype=torch.bfloat16)}
    group = _formats(16, 8)[fmt]
    edits = plan_lora_merge(DictView(base), [_file({"diffusion_model.blocks.0.fc": group})], scale=strength)
    key = "diffusion_model.blocks.0.fc.weight"
    got = edits.apply(key, base[key])
    assert got.dtype == torch.float32
    _close(got, ref.patch(base[key], group, strength), base[key])
    kinds = edits.report["lora"]["files"][0]["patches"]
    assert list(kinds) == [{"loha": "loha", "dora": "lora", "diff": "diff", "set_weight": "set"}.get(
        fmt, "lokr" if fmt.startswith("lokr") else "lora")]


def test_dora_on_a_fused_slice_normalises_the_slice_only():
    base = flux_base()
    key = "double_blocks.0.img_attn.qkv.weight"
    group = {**lora_pair(H, H, 2, seed=1, alpha=1.0), ".dora_scale": _randn(1, H, seed=2).abs() + 0.5}
    edits = plan_lora_merge(DictView(base), [_file({"transformer.transformer_blocks.0.attn.to_v": group})], scale=0.8)
    _close(edits.apply(key, base[key]), ref.patch(base[key], group, 0.8, (0, 2 * H, H)), base[key])


def test_diff_b_on_a_fused_slice_patches_the_same_bias_rows():
    base = flux_base()
    group = {**lora_pair(H, H, 2, seed=1), ".diff_b": _randn(H, seed=2)}
    edits = plan_lora_merge(DictView(base), [_file({"transformer.transformer_blocks.0.attn.to_k": group})])
    kb = "double_blocks.0.img_attn.qkv.bias"
    _close(edits.apply(kb, base[kb]), ref.bias_patch(base[kb], group[".diff_b"], 1.0, (0, H, H)), base[kb])


# ---------------------------------------------------------------------------------------------
# several files: order and dampening


@pytest.mark.parametrize("dampen", [True, False])
def test_several_files_apply_in_order_with_0_9_to_the_i_dampening(dampen):
    base = qwen_base()
    key = "transformer_blocks.0.attn.to_q.weight"
    files, groups = [], []
    for i in range(3):
        g = lora_pair(H, H, 2, seed=10 * i, up=".lora_B.weight", down=".lora_A.weight", alpha=float(i + 1))
        groups.append(g)
        files.append(_file({"transformer.transformer_blocks.0.attn.to_q": g}, name=f"l{i}.safetensors"))
    edits = plan_lora_merge(DictView(base), files, scale=0.5, dampen=dampen)
    want = base[key]
    for i, g in enumerate(groups):
        want = ref.patch(want, g, 0.5 * (0.9 ** i if dampen else 1.0))
    _close(edits.apply(key, base[key]), want, base[key])
    assert [f["strength"] for f in edits.report["lora"]["files"]] == pytest.approx(
        [0.5, 0.45, 0.405] if dampen else [0.5] * 3)
    assert len(edits.stages[key]) == 1 and len(edits.stages[key][0].cfg.patches) == 3


# ---------------------------------------------------------------------------------------------
# errors and the report


def test_a_lora_that_matches_nothing_is_an_error():
    base = wan_base()
    f = _file({"lora_te_text_model_encoder_layers_0_mlp_fc1": lora_pair(4, 4, 1, seed=1)}, name="te.safetensors")
    with pytest.raises(InputError, match=r"LoRA 'te.safetensors': none of its 1 layer names matches the model \(wan"):
        plan_lora_merge(DictView(base), [f])


def test_a_shape_mismatch_names_the_key():
    base = flux_base()
    f = _file({"transformer.transformer_blocks.0.attn.to_q": lora_pair(2 * H, H, 2, seed=1)})
    with pytest.raises(InputError, match=r"LoRA key 'transformer.transformer_blocks.0.attn.to_q' \(lora\): a delta of "
                                         r"\[16, 8\] does not fit the base tensor \[8, 8\]"):
        plan_lora_merge(DictView(base), [f])
    f = _file({"diffusion_model.img_in": {".diff": torch.zeros(H, 5)}})
    with pytest.raises(InputError, match=r"'diffusion_model.img_in' \(diff\): diff \[8, 5\] does not fit"):
        plan_lora_merge(DictView(base), [f])


def test_two_names_for_one_tensor_in_one_file_are_refused():
    base = wan_base()
    g = lora_pair(H, H, 2, seed=1)
    f = _file({"lora_unet_blocks_0_self_attn_q": g, "diffusion_model.blocks.0.self_attn.q": g})
    with pytest.raises(InputError, match="both patch diffusion_model.blocks.0.self_attn.q.weight; ComfyUI would silently"):
        plan_lora_merge(DictView(base), [f])


@pytest.mark.parametrize("group, match", [
    ({".lora_up.weight": torch.zeros(H, 2)}, "has no partner"),
    ({".a1.weight": torch.zeros(1)}, "GLoRA adapters are not supported"),
    ({".oft_blocks": torch.zeros(1)}, "OFT adapters are not supported"),
    ({".reshape_weight": torch.tensor([8, 8]), ".diff": torch.zeros(H, H)}, "changes the base tensor's shape"),
    ({**lora_pair(H, H, 2, seed=1), ".dora_scale": torch.ones(H, 1)}, r"DoRA magnitude dora_scale \[8, 1\]"),
    ({**lora_pair(H, H, 2, seed=1), ".diff": torch.zeros(H, H)}, r"several patches of one weight \(lora, diff\)"),
    ({".hada_w1_a": torch.zeros(H, 1)}, "LoHa layer .* lacks"),
    ({".lokr_w1": torch.zeros(2, 2)}, "LoKr layer .* has neither .lokr_w2"),
    ({".alpha": torch.ones(2), **lora_pair(H, H, 2, seed=1)}, "alpha must be one number"),
])
def test_bad_or_unsupported_layers_are_clear_errors(group, match):
    base = wan_base()
    with pytest.raises(InputError, match=match):
        plan_lora_merge(DictView(base), [_file({"diffusion_model.blocks.0.self_attn.q": group})])


def test_report_lists_unmatched_keys_and_targets():
    base = flux_base()
    groups = {"transformer.transformer_blocks.0.attn.to_q": lora_pair(H, H, 2, seed=1),
              "transformer.transformer_blocks.7.attn.to_q": lora_pair(H, H, 2, seed=3)}
    tensors = {p + s: t for p, g in groups.items() for s, t in g.items()}
    tensors["some_junk"] = torch.zeros(1)
    edits = plan_lora_merge(DictView(base), [lora_file_from_tensors(tensors, name="x.safetensors")])
    rep = edits.report["lora"]["files"][0]
    assert rep["targets"] == {"transformer.transformer_blocks.0.attn.to_q": "double_blocks.0.img_attn.qkv.weight[rows 0:8]"}
    assert rep["unmatched"] == ["some_junk", "transformer.transformer_blocks.7.attn.to_q.lora_down.weight",
                                "transformer.transformer_blocks.7.attn.to_q.lora_up.weight"]
    assert rep["matched_layers"] == 1 and rep["patches"] == {"lora": 1}
    assert edits.warnings[0].startswith("LoRA 'x.safetensors': 3 of 5 tensors match no tensor of the model and are "
                                        "NOT merged: some_junk, ")


# ---------------------------------------------------------------------------------------------
# files, configs, calibration rows


def test_merge_loras_reads_files_and_matches_the_in_memory_plan(tmp_path):
    base = flux_base("model.diffusion_model.")
    base_path = tmp_path / "base.safetensors"
    save_file(base, str(base_path))
    g1 = {"lora_unet_double_blocks_0_img_attn_qkv": lora_pair(3 * H, H, 2, seed=1, alpha=1.0)}
    g2 = {"transformer.single_transformer_blocks.0.proj_mlp": lora_pair(4 * H, H, 2, seed=3, up=".lora_B.weight",
                                                                         down=".lora_A.weight")}
    p1, p2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({p + s: t for p, g in g1.items() for s, t in g.items()}, str(p1))
    save_file({p + s: t for p, g in g2.items() for s, t in g.items()}, str(p2))
    with UnifiedSafetensorsLoader(base_path, low_memory=True) as f:
        view = LoaderView(f)
        edits = merge_loras(view, cfg=LoraMergeConfig((str(p1), str(p2)), scale=0.9))
        merged = {k: edits.apply(k, view.tensor(k)) for k in view.keys()}
    want = _merged(base, plan_lora_merge(DictView(base), [_file(g1, "a.safetensors"), _file(g2, "b.safetensors")],
                                         scale=0.9))
    for k in base:
        assert torch.equal(merged[k], want[k])
    assert [f["path"] for f in edits.report["lora"]["files"]] == [str(p1), str(p2)]


def test_lora_file_errors(tmp_path):
    with pytest.raises(InputError, match="LoRA file not found"):
        read_lora_file(tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="is a directory"):
        read_lora_file(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(InputError, match="cannot read LoRA file"):
        read_lora_file(bad)
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(InputError, match="holds no tensors"):
        read_lora_file(empty)


def test_config_validation_and_reference_options():
    assert LoraMergeConfig("a.safetensors").paths == ("a.safetensors",)
    with pytest.raises(ConfigError, match="finite number"):
        LoraMergeConfig(("a",), scale=float("nan"))
    with pytest.raises(ConfigError, match="finite number"):
        LoraMergeConfig(("a",), scale="1")
    with pytest.raises(ConfigError, match="must be non-empty"):
        LoraMergeConfig(("a", ""))
    with pytest.raises(ConfigError, match="given twice"):
        lora_config_from_options("a", ["a", "b"])
    cfg = lora_config_from_options(None, ["a", "b"], 0.5, False)
    assert (cfg.paths, cfg.scale, cfg.dampen, cfg.strengths()) == (("a", "b"), 0.5, False, (0.5, 0.5))


def test_calibration_rows_are_matched_exactly_and_stacked_on_fused_weights():
    base = flux_base("diffusion_model.")
    gq = lora_pair(H, H, 2, seed=1, up=".lora_B.weight", down=".lora_A.weight")
    gk = lora_pair(H, H, 3, seed=3, up=".lora_B.weight", down=".lora_A.weight")
    # two names that a loose endswith would confuse: linear1 vs linear1_qkv, and img_attn.qkv vs txt_attn.qkv
    gt = lora_pair(3 * H, H, 1, seed=5)
    f = _file({"transformer.transformer_blocks.0.attn.to_q": gq, "transformer.transformer_blocks.0.attn.to_k": gk,
               "lora_unet_double_blocks_0_txt_attn_qkv": gt,
               "transformer.transformer_blocks.0.attn.lokr_only": {".lokr_w1": torch.ones(1, 1)}})
    rows = lora_rows_for(DictView(base), f)
    assert set(rows) == {"diffusion_model.double_blocks.0.img_attn.qkv.weight",
                         "diffusion_model.double_blocks.0.txt_attn.qkv.weight"}
    assert torch.equal(rows["diffusion_model.double_blocks.0.img_attn.qkv.weight"],
                       torch.cat([gq[".lora_A.weight"], gk[".lora_A.weight"]]))
    assert torch.equal(rows["diffusion_model.double_blocks.0.txt_attn.qkv.weight"], gt[".lora_down.weight"])


def test_a_corrupt_lora_tensor_is_named():
    base = wan_base()
    g = lora_pair(H, H, 2, seed=1)
    g[".lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(InputError, match=r"LoRA key 'diffusion_model.blocks.0.self_attn.q.lora_up.weight' "
                                         r"\(torch.float32, \[8, 2\]\) holds NaN/Inf"):
        plan_lora_merge(DictView(base), [_file({"diffusion_model.blocks.0.self_attn.q": g})])
    fp8 = {".diff": torch.zeros(H, H).to(torch.float8_e4m3fn)}
    edits = plan_lora_merge(DictView(base), [_file({"diffusion_model.blocks.0.self_attn.q": fp8})])
    k = "diffusion_model.blocks.0.self_attn.q.weight"
    assert torch.equal(edits.apply(k, base[k]), base[k])
