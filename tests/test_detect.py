"""cq.detect: the key layouts of every preset family are recognised, with evidence; unknown models get none."""

from __future__ import annotations

import pytest
import torch

from cq.detect import FAMILIES, Detection, detect_architecture, resolve_presets
from cq.errors import ConfigError
from cq.presets import PRESETS

D = "model.diffusion_model."

LAYOUTS = {
    "flux1": {f"{D}img_in.weight": (3072, 64), f"{D}txt_in.weight": (3072, 4096),
              f"{D}time_in.in_layer.weight": (3072, 256), f"{D}vector_in.in_layer.weight": (3072, 768),
              f"{D}guidance_in.in_layer.weight": (3072, 256), f"{D}double_blocks.0.img_attn.norm.key_norm.scale": (128,),
              f"{D}double_blocks.0.img_attn.qkv.weight": (9216, 3072), f"{D}double_blocks.0.img_mod.lin.weight": (18432, 3072),
              f"{D}single_blocks.0.linear1.weight": (21504, 3072), f"{D}final_layer.linear.weight": (64, 3072)},
    "flux2": {"img_in.weight": (6144, 128), "txt_in.weight": (6144, 15360),
              "double_blocks.0.img_attn.norm.key_norm.scale": (128,), "double_blocks.0.img_attn.qkv.weight": (18432, 6144),
              "double_stream_modulation_img.lin.weight": (36864, 6144), "single_stream_modulation.lin.weight": (18432, 6144),
              "final_layer.linear.weight": (128, 6144)},
    "chroma": {"img_in.weight": (3072, 64), "distilled_guidance_layer.in_proj.weight": (5120, 64),
               "distilled_guidance_layer.norms.0.scale": (5120,), "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
               "double_blocks.0.img_attn.qkv.weight": (9216, 3072)},
    "chroma_radiance": {"img_in_patch.weight": (3072, 3, 16, 16), "distilled_guidance_layer.norms.0.scale": (5120,),
                        "double_blocks.0.img_attn.norm.key_norm.scale": (128,), "nerf_blocks.0.norm.scale": (64,),
                        "nerf_image_embedder.embedder.0.weight": (64, 67), "__x0__": (0,)},
    "hunyuan_video_1.5": {f"{D}txt_in.individual_token_refiner.blocks.0.norm1.weight": (2048,),
                          f"{D}img_in.proj.weight": (2048, 65, 1, 1, 1), f"{D}double_blocks.0.img_attn_q.weight": (2048, 2048),
                          f"{D}cond_type_embedding.weight": (3, 2048), f"{D}vision_in.proj.0.weight": (1152,)},
    "hunyuan_video": {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (3072,),
                      "img_in.proj.weight": (3072, 16, 1, 2, 2), "double_blocks.0.img_attn_qkv.weight": (9216, 3072),
                      "vector_in.in_layer.weight": (3072, 768)},
    "wan": {f"{D}head.modulation": (1, 2, 5120), f"{D}head.head.weight": (64, 5120),
            f"{D}patch_embedding.weight": (5120, 16, 1, 2, 2), f"{D}blocks.0.self_attn.q.weight": (5120, 5120),
            f"{D}blocks.1.self_attn.q.weight": (5120, 5120), f"{D}text_embedding.0.weight": (5120, 4096),
            f"{D}time_embedding.0.weight": (5120, 256)},
    "qwen_image": {"transformer_blocks.0.img_mod.1.weight": (18432, 3072), "txt_norm.weight": (3584,),
                   "img_in.weight": (3072, 64), "transformer_blocks.0.attn.add_q_proj.weight": (3072, 3072),
                   "time_text_embed.timestep_embedder.linear_1.weight": (3072, 256)},
    "z_image": {"cap_embedder.1.weight": (3840, 2560), "noise_refiner.0.attention.k_norm.weight": (128,),
                "x_embedder.weight": (3840, 64), "layers.0.attention.qkv.weight": (11520, 3840),
                "cap_pad_token": (1, 3840), "x_pad_token": (1, 3840)},
    "lumina2": {"cap_embedder.1.weight": (2304, 2304), "noise_refiner.0.attention.k_norm.weight": (96,),
                "layers.0.attention.qkv.weight": (4608, 2304)},
    "t5": {"encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096), "shared.weight": (32128, 4096),
           "encoder.final_layer_norm.weight": (4096,), "decoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096)},
    "mistral": {"model.embed_tokens.weight": (131072, 5120), "model.layers.0.self_attn.q_proj.weight": (4096, 5120),
                "model.layers.0.mlp.gate_proj.weight": (32768, 5120), "model.norm.weight": (5120,)},
    "llm_text_encoder": {"model.embed_tokens.weight": (152064, 3584), "model.layers.0.self_attn.q_proj.weight": (3584, 3584),
                         "model.layers.0.self_attn.q_proj.bias": (3584,), "model.layers.0.mlp.gate_proj.weight": (18944, 3584),
                         "visual.blocks.0.mlp.gate_proj.weight": (3420, 1280)},
    "visual": {"visual.blocks.0.mlp.gate_proj.weight": (3420, 1280), "visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14)},
    "lora": {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (16, 3072),
             "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": (9216, 16),
             "lora_unet_double_blocks_0_img_attn_proj.alpha": ()},
}


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_each_layout_is_recognised_with_its_presets(family):
    d = detect_architecture(LAYOUTS[family])
    assert d.family == family
    assert d.presets == FAMILIES[family]
    assert d.evidence and all(isinstance(e, str) and e for e in d.evidence)
    assert d.describe().startswith("architecture: " + family)


@pytest.mark.parametrize("family", sorted(set(LAYOUTS) - {"lora", "visual"}))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "transformer.", "text_encoders.t5xxl.transformer."])
def test_detection_does_not_depend_on_the_key_prefix(family, prefix):
    keys = {prefix + k.removeprefix(D): s for k, s in LAYOUTS[family].items()}
    d = detect_architecture(keys)
    assert (d.family, d.presets) == (family, FAMILIES[family])
    assert d.prefix in (prefix, prefix + "model.")  # decoder LLM anchors sit under "model."


def test_every_family_maps_to_real_presets_and_every_preset_family_is_covered():
    assert all(p in PRESETS for ps in FAMILIES.values() for p in ps)
    covered = {p for f in LAYOUTS for p in FAMILIES[f]}
    # zimage_refiner, distillation_small and nerf_small cannot be told apart from their large siblings by keys
    assert set(PRESETS) - covered == {"zimage_refiner", "distillation_small", "nerf_small"}


def test_prefix_is_reported_and_unknown_model_has_no_preset():
    assert detect_architecture(LAYOUTS["wan"]).prefix == D
    unet = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3), "model.diffusion_model.out.2.weight": (4, 320, 3, 3)}
    d = detect_architecture(unet)
    assert d.family is None and d.presets == () and "not recognised" in d.describe()


def test_fp8_companion_keys_do_not_change_detection():
    keys = dict(LAYOUTS["flux1"])
    keys.update({"scaled_fp8": (0,), f"{D}double_blocks.0.img_attn.qkv.scale_weight": ()})
    assert detect_architecture(keys).family == "flux1"


def test_detection_from_a_model_view_reads_shapes_only(tmp_path):
    from cq.io import UnifiedSafetensorsLoader, write_safetensors
    from cq.model import LoaderView

    p = tmp_path / "z.safetensors"  # the anchors only, with the one shape detection reads (dim 3840) kept small
    write_safetensors(p, {"cap_embedder.1.weight": torch.zeros(3840, 1),
                          "noise_refiner.0.attention.k_norm.weight": torch.zeros(128)})
    d = detect_architecture(LoaderView(UnifiedSafetensorsLoader(str(p))))
    assert d.family == "z_image" and d.presets == ("zimage",)


def test_resolve_presets_rules():
    d = detect_architecture(LAYOUTS["flux2"])
    assert resolve_presets(d) == (("flux2",), "auto preset: --flux2 (detected flux2)")
    assert resolve_presets(d, auto=False)[0] == ()
    assert resolve_presets(d, chosen=["flux2"]) == (("flux2",), "preset chosen: --flux2")
    assert "detected flux2" in resolve_presets(d, chosen=["wan"])[1]
    assert resolve_presets(detect_architecture(LAYOUTS["flux1"]))[0] == ()
    assert resolve_presets(Detection(None))[1] == "architecture not recognised; generic rules"
    with pytest.raises(ConfigError, match="valid presets"):
        resolve_presets(d, chosen=["flux1"])
