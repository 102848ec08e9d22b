"""The 15 model presets of ``convert_to_quant`` (``--t5xxl`` … ``--lora``) as a data registry.

A preset names key *substrings* (case-sensitive, ``substring in key``) of layers that stay in
high precision (``keep``) and of tensors that are dropped from the output (``remove``). The lists
are the reference's, verbatim (``convert_to_quant/constants.py`` of the fork, v0.8.2), including
its broad entries: ``"norm"`` keeps every key containing "norm", ``"scale"`` (``--lora``) keeps
``scale_shift_table``.

The reference splits ``keep`` into an ``exclude`` and a ``highprec`` list that it treats
identically; :class:`Preset` keeps that split only so that :data:`MODEL_FILTERS` can be rebuilt
exactly (``Preset.highprec`` is the trailing part of ``keep`` the reference called ``highprec``).
"""

from __future__ import annotations

import types
from typing import Any, Mapping

import attrs

from .errors import ConfigError

__all__ = [
    "Preset",
    "PRESETS",
    "MODEL_FILTERS",
    "AVOID_KEY_NAMES",
    "LORA_AVOID_KEY_NAMES",
    "T5XXL_REMOVE_KEY_NAMES",
    "VISUAL_AVOID_KEY_NAMES",
    "QWEN_AVOID_KEY_NAMES",
    "HUNYUAN_AVOID_KEY_NAMES",
    "ZIMAGE_AVOID_KEY_NAMES",
    "FLUX2_LAYER_KEYNAMES",
    "DISTILL_LAYER_KEYNAMES_LARGE",
    "DISTILL_LAYER_KEYNAMES_SMALL",
    "NERF_LAYER_KEYNAMES_LARGE",
    "NERF_LAYER_KEYNAMES_SMALL",
    "RADIANCE_LAYER_KEYNAMES",
    "WAN_LAYER_KEYNAMES",
    "QWEN_LAYER_KEYNAMES",
    "ZIMAGE_LAYER_KEYNAMES",
    "ZIMAGE_REFINER_LAYER_KEYNAMES",
    "get_preset",
    "build_exclusion_patterns",
]

# --- the reference's substring lists (same names, same order) --------------------------------

AVOID_KEY_NAMES: tuple[str, ...] = (
    "norm", "bias", "embed_tokens", "lm_head", "shared", "patch_embedding",
    "audio_model.patch_embedding", "ref_conv", "control_adapter", "motion_encoder.enc.net_app",
    "face_encoder.conv", "pose_patch_embedding", "motion_encoder.enc.fc", "img_emb.proj", "k_norm",
    "q_norm", "motion_encoder.dec", "head.modulation", "casual_audio_encoder", "cond_encoder",
    "frame_packer", "norm_k", "norm_q", "tekken_model", "multi_modal_projector", "patch_conv",
    "ln_pre", "input_layernorm", "attention_norm", "post_attention_layernorm",
)
LORA_AVOID_KEY_NAMES: tuple[str, ...] = ("alpha", "scale")
T5XXL_REMOVE_KEY_NAMES: tuple[str, ...] = ("decoder", "lm_head")
VISUAL_AVOID_KEY_NAMES: tuple[str, ...] = ("mlp.down_proj", "mlp.up_proj", "mlp.gate_proj")
QWEN_AVOID_KEY_NAMES: tuple[str, ...] = ("norm_added_k", "norm_added_q", "norm_k", "norm_q", "txt_norm")
HUNYUAN_AVOID_KEY_NAMES: tuple[str, ...] = (
    "layernorm", "img_attn_k_norm", "img_attn_q_norm", "txt_attn_k_norm", "txt_attn_q_norm", "norm1",
    "norm2", "vision_in.proj.0", "vision_in.proj.4", "img_in.proj", "cond_type_embedding",
)
ZIMAGE_AVOID_KEY_NAMES: tuple[str, ...] = (
    "cap_embedder.0", "cap_pad_token", "attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2",
    "k_norm", "q_norm", "x_pad_token", "norm", "bias",
)
FLUX2_LAYER_KEYNAMES: tuple[str, ...] = (
    "stream_modulation", "guidance_in", "time_in", "final_layer", "img_in", "txt_in",
)
DISTILL_LAYER_KEYNAMES_LARGE: tuple[str, ...] = ("distilled_guidance_layer", "final_layer", "img_in", "txt_in")
DISTILL_LAYER_KEYNAMES_SMALL: tuple[str, ...] = ("distilled_guidance_layer",)
NERF_LAYER_KEYNAMES_LARGE: tuple[str, ...] = (
    "distilled_guidance_layer", "nerf_blocks", "nerf_image_embedder", "txt_in",
)
NERF_LAYER_KEYNAMES_SMALL: tuple[str, ...] = ("distilled_guidance_layer", "nerf_blocks", "nerf_image_embedder")
RADIANCE_LAYER_KEYNAMES: tuple[str, ...] = ("img_in_patch", "nerf_final_layer_conv", "__x0__")
WAN_LAYER_KEYNAMES: tuple[str, ...] = (
    "text_embedding", "time_embedding", "audio_model.text_embedding", "casual_audio_encoder",
    "frame_packer", "trainable_cond_mask", "cond_encoder", "audio_model.time_embedding",
    "time_projection", "video_model.time_projection", "head.head", "face_encoder.out_proj",
    "face_adapter", "audio_injector",
)
QWEN_LAYER_KEYNAMES: tuple[str, ...] = (
    "time_text_embed", "img_in", "norm_out", "proj_out", "transformer_blocks.0.img_mod.1", "txt_in",
)
ZIMAGE_LAYER_KEYNAMES: tuple[str, ...] = (
    "x_embedder", "clip_text_pooled_proj", "final_layer", "cap_embedder.1", "adaLN_modulation",
    "t_embedder", "time_text_embed", "pos_embed", "proj_out",
)
ZIMAGE_REFINER_LAYER_KEYNAMES: tuple[str, ...] = ("context_refiner", "noise_refiner")

CATEGORIES = ("text", "diffusion", "video", "image")


def _substrings(instance, attribute, value):
    if not all(isinstance(s, str) and s for s in value):
        raise ConfigError(f"preset {instance.name!r}: {attribute.name} must hold non-empty strings, got {value!r}")


@attrs.frozen
class Preset:
    """A model preset: key substrings kept in high precision and substrings removed from the output.

    Args:
        name: the flag name without dashes (``"wan"`` for ``--wan``).
        category: ``"text"``, ``"diffusion"``, ``"video"`` or ``"image"``.
        keep: substrings; a candidate layer whose key contains one is not quantized (or uses the
            fallback format). Matching is ``substring in key``, case-sensitive, on the full key.
        remove: substrings; *any* tensor whose key contains one is dropped from the output.
        description: one line for ``--help``.
        highprec: the trailing part of ``keep`` that the reference listed as ``highprec`` (only
            used to rebuild :data:`MODEL_FILTERS`; both parts behave identically).

    Example:
        >>> p = Preset("mine", "image", keep=("final_layer",), remove=(), description="demo")
        >>> p.keeps("model.final_layer.linear.weight"), p.keeps("blocks.0.attn.weight")
        ('final_layer', None)
    """

    name: str
    category: str = attrs.field()
    keep: tuple[str, ...] = attrs.field(converter=tuple, validator=_substrings)
    remove: tuple[str, ...] = attrs.field(converter=tuple, validator=_substrings)
    description: str = ""
    highprec: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_substrings)

    @category.validator
    def _category(self, attribute, value):
        if value not in CATEGORIES:
            raise ConfigError(f"preset {self.name!r}: category {value!r} is not one of {list(CATEGORIES)}")

    @highprec.validator
    def _suffix(self, attribute, value):
        if value and self.keep[len(self.keep) - len(value):] != value:
            raise ConfigError(f"preset {self.name!r}: highprec {value!r} must be the last entries of keep")

    @property
    def exclude(self) -> tuple[str, ...]:
        """The part of ``keep`` the reference listed as ``exclude``."""
        return self.keep[: len(self.keep) - len(self.highprec)]

    def keeps(self, key: str) -> str | None:
        """The first ``keep`` substring found in ``key``, or ``None``."""
        return next((s for s in self.keep if s in key), None)

    def removes(self, key: str) -> str | None:
        """The first ``remove`` substring found in ``key``, or ``None``."""
        return next((s for s in self.remove if s in key), None)


def _p(name, category, description, exclude=(), highprec=(), remove=()):
    return Preset(name, category, keep=tuple(exclude) + tuple(highprec), remove=remove,
                  description=description, highprec=highprec)


#: Every preset, in the reference's order (the order ``--help`` lists them and filters apply).
PRESETS: Mapping[str, Preset] = types.MappingProxyType({p.name: p for p in (
    _p("t5xxl", "text", "T5-XXL text encoder: keep norms, biases and embeddings; drop decoder and lm_head",
       exclude=AVOID_KEY_NAMES, remove=T5XXL_REMOVE_KEY_NAMES),
    _p("mistral", "text", "Mistral text encoder: keep norms, biases and embeddings", exclude=AVOID_KEY_NAMES),
    _p("visual", "text", "Visual encoder: keep the MLP projections (down/up/gate)",
       exclude=VISUAL_AVOID_KEY_NAMES),
    _p("flux2", "diffusion", "Flux.2: keep modulation, guidance, time, final and input layers",
       highprec=FLUX2_LAYER_KEYNAMES),
    _p("distillation_large", "diffusion", "Chroma/distilled (large): keep distilled guidance, final and input layers",
       highprec=DISTILL_LAYER_KEYNAMES_LARGE),
    _p("distillation_small", "diffusion", "Chroma/distilled (small): keep the distilled guidance layer",
       highprec=DISTILL_LAYER_KEYNAMES_SMALL),
    _p("nerf_large", "diffusion", "NeRF (large): keep NeRF blocks, distilled guidance and txt_in",
       highprec=NERF_LAYER_KEYNAMES_LARGE),
    _p("nerf_small", "diffusion", "NeRF (small): keep NeRF blocks and distilled guidance",
       highprec=NERF_LAYER_KEYNAMES_SMALL),
    _p("radiance", "diffusion", "Radiance: keep img_in_patch and the final NeRF conv layer",
       highprec=RADIANCE_LAYER_KEYNAMES),
    _p("wan", "video", "WAN video: keep norms, embeddings, encoders and the head",
       exclude=AVOID_KEY_NAMES, highprec=WAN_LAYER_KEYNAMES),
    _p("hunyuan", "video", "Hunyuan Video 1.5: keep layernorms, attention norms and vision_in",
       exclude=HUNYUAN_AVOID_KEY_NAMES),
    _p("qwen", "image", "Qwen Image: keep added norms, time/text embeddings, input and output layers",
       exclude=QWEN_AVOID_KEY_NAMES, highprec=QWEN_LAYER_KEYNAMES),
    _p("zimage", "image", "Z-Image: keep norms, biases, embedders and final layers",
       exclude=ZIMAGE_AVOID_KEY_NAMES, highprec=ZIMAGE_LAYER_KEYNAMES),
    _p("zimage_refiner", "image", "Z-Image refiner: keep norms, biases and the context/noise refiners",
       exclude=ZIMAGE_AVOID_KEY_NAMES, highprec=ZIMAGE_REFINER_LAYER_KEYNAMES),
    _p("lora", "diffusion", "LoRA file: keep alpha/scale tensors, quantize lora_up/lora_down",
       exclude=LORA_AVOID_KEY_NAMES),
)})


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (the flag without dashes).

    Example:
        >>> get_preset("t5xxl").remove
        ('decoder', 'lm_head')
    """
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown preset {name!r}; valid presets are {list(PRESETS)}") from None


def _filter_entry(p: Preset) -> Mapping[str, Any]:
    return types.MappingProxyType({
        "help": p.description,
        "category": p.category,
        "exclude": p.exclude,
        "highprec": p.highprec,
        "remove": p.remove,
    })


#: The reference's ``MODEL_FILTERS`` dict form, read-only: ``{name: {"help", "category",
#: "exclude", "highprec", "remove"}}`` with tuples for lists (every key is always present).
MODEL_FILTERS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType(
    {name: _filter_entry(p) for name, p in PRESETS.items()}
)


def build_exclusion_patterns(active_filters: Mapping[str, bool]) -> tuple[list[str], list[str], list[str]]:
    """``(exclude, highprec, remove)`` substring lists of the active presets (reference helper).

    Example:
        >>> build_exclusion_patterns({"radiance": True, "t5xxl": False})
        ([], ['img_in_patch', 'nerf_final_layer_conv', '__x0__'], [])
    """
    exclude: list[str] = []
    highprec: list[str] = []
    remove: list[str] = []
    for name, p in PRESETS.items():
        if (active_filters or {}).get(name, False):
            exclude.extend(p.exclude)
            highprec.extend(p.highprec)
            remove.extend(p.remove)
    return exclude, highprec, remove
