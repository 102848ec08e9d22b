"""Tests for cq.presets and cq.constants: the reference's 15 presets, verbatim, as data."""

import random
import typing

import pytest
import torch

from cq import constants
from cq.errors import ConfigError
from cq.presets import (
    AVOID_KEY_NAMES,
    MODEL_FILTERS,
    PRESETS,
    Preset,
    build_exclusion_patterns,
    get_preset,
)
from cq.selection import why_not_candidate, SelectionConfig, decide

REFERENCE_ORDER = ["t5xxl", "mistral", "visual", "flux2", "distillation_large", "distillation_small", "nerf_large",
                   "nerf_small", "radiance", "wan", "hunyuan", "qwen", "zimage", "zimage_refiner", "lora"]


def test_registry_has_the_15_reference_presets_in_order():
    assert list(PRESETS) == REFERENCE_ORDER
    assert list(MODEL_FILTERS) == REFERENCE_ORDER
    assert {p.category for p in PRESETS.values()} == {"text", "diffusion", "video", "image"}


def test_lists_are_the_reference_lists():
    assert len(AVOID_KEY_NAMES) == 30
    assert AVOID_KEY_NAMES[:3] == ("norm", "bias", "embed_tokens")
    assert AVOID_KEY_NAMES[-1] == "post_attention_layernorm"
    t5 = MODEL_FILTERS["t5xxl"]
    assert t5["exclude"] == AVOID_KEY_NAMES and t5["highprec"] == () and t5["remove"] == ("decoder", "lm_head")
    wan = MODEL_FILTERS["wan"]
    assert wan["exclude"] == AVOID_KEY_NAMES
    assert wan["highprec"][0] == "text_embedding" and "head.head" in wan["highprec"] and len(wan["highprec"]) == 14
    assert MODEL_FILTERS["qwen"]["exclude"] == ("norm_added_k", "norm_added_q", "norm_k", "norm_q", "txt_norm")
    assert MODEL_FILTERS["qwen"]["highprec"] == ("time_text_embed", "img_in", "norm_out", "proj_out",
                                                 "transformer_blocks.0.img_mod.1", "txt_in")
    assert MODEL_FILTERS["zimage_refiner"]["highprec"] == ("context_refiner", "noise_refiner")
    assert MODEL_FILTERS["zimage"]["exclude"][-2:] == ("norm", "bias")
    assert MODEL_FILTERS["lora"]["exclude"] == ("alpha", "scale")
    assert MODEL_FILTERS["radiance"]["highprec"] == ("img_in_patch", "nerf_final_layer_conv", "__x0__")
    for name, p in PRESETS.items():
        f = MODEL_FILTERS[name]
        assert p.keep == f["exclude"] + f["highprec"]
        assert f["category"] == p.category and f["help"] == p.description and p.description
        assert p.remove == (("decoder", "lm_head") if name == "t5xxl" else ())


def test_model_filters_is_read_only():
    with pytest.raises(TypeError):
        MODEL_FILTERS["new"] = {}
    with pytest.raises(TypeError):
        MODEL_FILTERS["wan"]["exclude"] = ()
    with pytest.raises(TypeError):
        PRESETS["wan"] = PRESETS["t5xxl"]


# (preset, key, expected action); key names from the model families each preset targets.
CASES = [
    ("t5xxl", "encoder.block.0.layer.0.SelfAttention.q.weight", "quantize"),
    ("t5xxl", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "quantize"),
    ("t5xxl", "blocks.0.shared.weight", "keep"),
    ("t5xxl", "encoder.block.0.layer.0.layer_norm.weight", "keep"),
    ("t5xxl", "decoder.block.0.layer.0.SelfAttention.q.weight", "remove"),
    ("t5xxl", "lm_head.weight", "remove"),
    ("mistral", "model.layers.0.self_attn.q_proj.weight", "quantize"),
    ("mistral", "model.layers.0.input_layernorm.weight", "keep"),
    ("mistral", "lm_head.weight", "keep"),
    ("mistral", "multi_modal_projector.linear_1.weight", "keep"),
    ("visual", "visual.blocks.0.mlp.down_proj.weight", "keep"),
    ("visual", "visual.blocks.0.mlp.gate_proj.weight", "keep"),
    ("visual", "visual.blocks.0.attn.qkv.weight", "quantize"),
    ("flux2", "double_blocks.0.img_attn.qkv.weight", "quantize"),
    ("flux2", "double_stream_modulation_img.lin.weight", "keep"),
    ("flux2", "time_in.in_layer.weight", "keep"),
    ("flux2", "guidance_in.out_layer.weight", "keep"),
    ("flux2", "final_layer.linear.weight", "keep"),
    ("flux2", "img_in.weight", "keep"),
    ("flux2", "txt_in.weight", "keep"),
    ("distillation_large", "distilled_guidance_layer.layers.0.in_layer.weight", "keep"),
    ("distillation_large", "final_layer.linear.weight", "keep"),
    ("distillation_large", "double_blocks.0.img_mlp.0.weight", "quantize"),
    ("distillation_small", "distilled_guidance_layer.in_proj.weight", "keep"),
    ("distillation_small", "final_layer.linear.weight", "quantize"),
    ("nerf_large", "nerf_blocks.0.param_generator.weight", "keep"),
    ("nerf_large", "nerf_image_embedder.embedder.0.weight", "keep"),
    ("nerf_large", "txt_in.weight", "keep"),
    ("nerf_large", "double_blocks.0.img_attn.proj.weight", "quantize"),
    ("nerf_small", "nerf_blocks.0.param_generator.weight", "keep"),
    ("nerf_small", "txt_in.weight", "quantize"),
    ("radiance", "img_in_patch.weight", "keep"),
    ("radiance", "nerf_final_layer_conv.conv.weight", "keep"),
    ("radiance", "double_blocks.0.txt_mlp.2.weight", "quantize"),
    ("wan", "blocks.0.self_attn.q.weight", "quantize"),
    ("wan", "blocks.0.ffn.0.weight", "quantize"),
    ("wan", "text_embedding.0.weight", "keep"),
    ("wan", "time_embedding.2.weight", "keep"),
    ("wan", "time_projection.1.weight", "keep"),
    ("wan", "head.head.weight", "keep"),
    ("wan", "img_emb.proj.1.weight", "keep"),
    ("hunyuan", "double_blocks.0.img_attn_qkv.weight", "quantize"),
    ("hunyuan", "vision_in.proj.0.weight", "keep"),
    ("hunyuan", "img_in.proj.weight", "keep"),
    ("hunyuan", "cond_type_embedding.0.weight", "keep"),
    ("hunyuan", "txt_in.individual_token_refiner.blocks.0.norm1.weight", "keep"),
    ("qwen", "transformer_blocks.0.attn.to_q.weight", "quantize"),
    ("qwen", "transformer_blocks.0.img_mod.1.weight", "keep"),
    ("qwen", "transformer_blocks.1.img_mod.1.weight", "quantize"),
    ("qwen", "time_text_embed.timestep_embedder.linear_1.weight", "keep"),
    ("qwen", "norm_out.linear.weight", "keep"),
    ("qwen", "proj_out.weight", "keep"),
    ("qwen", "txt_in.weight", "keep"),
    ("zimage", "layers.0.attention.qkv.weight", "quantize"),
    ("zimage", "layers.0.feed_forward.w1.weight", "quantize"),
    ("zimage", "x_embedder.weight", "keep"),
    ("zimage", "cap_embedder.1.weight", "keep"),
    ("zimage", "layers.0.adaLN_modulation.0.weight", "keep"),
    ("zimage", "t_embedder.mlp.0.weight", "keep"),
    ("zimage", "final_layer.linear.weight", "keep"),
    ("zimage", "context_refiner.0.attention.qkv.weight", "quantize"),
    ("zimage_refiner", "context_refiner.0.attention.qkv.weight", "keep"),
    ("zimage_refiner", "noise_refiner.0.feed_forward.w2.weight", "keep"),
    ("zimage_refiner", "layers.0.attention.out.weight", "quantize"),
    ("lora", "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight", "quantize"),
    ("lora", "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight", "quantize"),
    ("lora", "lora_unet_blocks_0_adaLN_scale.lora_down.weight", "keep"),
]


@pytest.mark.parametrize("preset,key,action", CASES, ids=[f"{p}:{k}" for p, k, _ in CASES])
def test_each_preset_keeps_what_the_reference_keeps(preset, key, action):
    d = decide(key, (64, 32), torch.bfloat16, SelectionConfig(presets=(preset,)))
    assert d.action == action, d
    if action == "keep":
        assert d.reason.startswith(f"preset {preset}: ")
    # without the preset, every one of these 2-D .weight keys is quantized
    assert decide(key, (64, 32), torch.bfloat16).action == "quantize"


def test_substring_matching_is_case_sensitive_and_on_the_full_key():
    wan = get_preset("wan")
    assert wan.keeps("model.diffusion_model.head.head.weight") == "head.head"
    assert wan.keeps("HEAD.HEAD.weight") is None
    assert get_preset("t5xxl").removes("encoder.final_layer_norm.weight") is None
    assert get_preset("t5xxl").removes("decoder.final_layer_norm.weight") == "decoder"


def test_random_keys_are_kept_exactly_when_they_contain_a_keep_substring():
    rng = random.Random(1234)
    vocab = ["blocks", "0", "7", "attn", "qkv", "mlp", "fc1", "norm", "head", "img_in", "txt_in", "proj_out",
             "time_text_embed", "final_layer", "lm_head", "decoder", "shared", "alpha", "scale"]
    for _ in range(300):
        key = ".".join(rng.choice(vocab) for _ in range(rng.randint(1, 5))) + ".weight"
        name = rng.choice(REFERENCE_ORDER)
        p = PRESETS[name]
        d = decide(key, (32, 32), torch.float16, SelectionConfig(presets=(name,)))
        if any(s in key for s in p.remove):
            assert d.action == "remove"
        elif why_not_candidate(key, (32, 32), torch.float16):  # e.g. "shared.weight", T5's embedding table
            assert d.action == "keep" and d.rule == "not_candidate"
        elif any(s in key for s in p.keep):
            assert d.action == "keep" and d.rule == "preset"
        else:
            assert d.action == "quantize" and d.rule == "default"


def test_preset_validation_and_lookup_errors():
    with pytest.raises(ConfigError, match="valid presets are"):
        get_preset("flux")
    with pytest.raises(ConfigError, match="category"):
        Preset("x", "audio", keep=(), remove=())
    with pytest.raises(ConfigError, match="non-empty strings"):
        Preset("x", "image", keep=("",), remove=())
    with pytest.raises(ConfigError, match="last entries of keep"):
        Preset("x", "image", keep=("a", "b"), remove=(), highprec=("a",))
    p = Preset("x", "image", keep=["a", "b"], remove=[], highprec=["b"])
    assert p.exclude == ("a",) and p.keep == ("a", "b")


def test_build_exclusion_patterns_concatenates_active_presets_in_registry_order():
    exclude, highprec, remove = build_exclusion_patterns({"lora": True, "t5xxl": True, "flux2": False})
    assert exclude == list(AVOID_KEY_NAMES) + ["alpha", "scale"]
    assert highprec == [] and remove == ["decoder", "lm_head"]
    assert build_exclusion_patterns({}) == ([], [], [])


def test_constants_match_the_reference():
    assert constants.TARGET_INT8_DTYPE is torch.int8
    assert constants.COMPUTE_DTYPE is torch.float32 and constants.SCALE_DTYPE is torch.float32
    assert (constants.INT8_MIN, constants.INT8_MAX, constants.INT8_SYMMETRIC_MAX) == (-128, 127, 127)
    assert constants.VALID_QUANT_FORMATS == {"int8_tensorwise", "int8_blockwise", "int8_axiswise"}
    assert constants.MODEL_FILTERS is MODEL_FILTERS
    assert constants.WeightTensor is torch.Tensor and constants.HessianMatrix is torch.Tensor
    assert typing.get_origin(constants.FilterFlags) is dict and typing.get_args(constants.FilterFlags) == (str, bool)
