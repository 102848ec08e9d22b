"""Recognise a model's architecture from its tensor names and shapes, and pick the matching preset.

The anchors are the ones ComfyUI's ``comfy/model_detection.py`` (and its text-encoder detection)
keys on, e.g. Flux/Chroma ``double_blocks.0.img_attn.norm.key_norm.scale`` with
``double_stream_modulation_img.lin.weight`` for Flux.2, Wan ``head.modulation``, HunyuanVideo
``txt_in.individual_token_refiner.blocks.0.norm1.weight``, Lumina-2/Z-Image ``cap_embedder.1.weight``
(``dim`` 3840 = Z-Image). Keys may carry any prefix (``model.diffusion_model.``, ``transformer.``, …):
an anchor matches a key equal to it or ending in ``"." + anchor``. Only names and shapes are read.

Example:
    >>> d = detect_architecture({"model.diffusion_model.head.modulation": (1, 6, 5120),
    ...                          "model.diffusion_model.blocks.0.self_attn.q.weight": (5120, 5120)})
    >>> d.family, d.presets, d.prefix
    ('wan', ('wan',), 'model.diffusion_model.')
"""

from __future__ import annotations

from typing import Iterable, Mapping

import attrs

from .errors import ConfigError
from .presets import PRESETS

__all__ = ["Detection", "detect_architecture", "resolve_presets", "FAMILIES"]

#: Families cq recognises → the presets it applies (empty: cq's generic rules; no preset exists).
FAMILIES: Mapping[str, tuple[str, ...]] = {
    "lora": ("lora",),
    "flux1": (),
    "flux2": ("flux2",),
    "chroma": ("distillation_large",),
    "chroma_radiance": ("nerf_large", "radiance"),
    "hunyuan_video": ("hunyuan",),
    "hunyuan_video_1.5": ("hunyuan",),
    "wan": ("wan",),
    "qwen_image": ("qwen",),
    "z_image": ("zimage",),
    "lumina2": (),
    "t5": ("t5xxl",),
    "mistral": ("mistral",),
    "llm_text_encoder": ("mistral",),
    "visual": ("visual",),
}


@attrs.frozen
class Detection:
    """What :func:`detect_architecture` found: ``family`` (``None``: unknown), the ``presets`` it maps
    to, the key ``prefix`` and the ``evidence`` lines (anchor keys and shapes) that decided it."""

    family: str | None
    presets: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()
    prefix: str = ""

    @property
    def preset(self) -> str | None:
        """The first preset, or ``None``."""
        return self.presets[0] if self.presets else None

    def describe(self) -> str:
        """Lines for ``--dry-run`` and the run log."""
        if self.family is None:
            head = "architecture: not recognised; converting with cq's generic rules"
        elif self.presets:
            head = f"architecture: {self.family} (preset {', '.join('--' + p for p in self.presets)})"
        else:
            head = f"architecture: {self.family} (no cq preset; generic rules)"
        return "\n".join([head] + [f"  - {e}" for e in self.evidence])


class _Keys:
    """Suffix look-ups over ``{key: shape}``, remembering the first anchor's prefix."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = shapes
        self.prefix: str | None = None

    def find(self, anchor: str) -> str | None:
        want = (self.prefix or "") + anchor
        if self.prefix is not None:
            return want if want in self.shapes else None
        for k in self.shapes:
            if k == anchor or k.endswith("." + anchor):
                return k
        return None

    def has(self, *anchors: str) -> str | None:
        """The first of ``anchors`` present (as a key suffix), or ``None``."""
        for a in anchors:
            k = self.find(a)
            if k is not None:
                return k
        return None

    def anchor(self, *anchors: str) -> str | None:
        """Like :meth:`has`, and fix the prefix to the one found (later look-ups use it)."""
        k = self.has(*anchors)
        if k is not None and self.prefix is None:
            a = next(a for a in anchors if k == a or k.endswith("." + a))
            self.prefix = k[: len(k) - len(a)]
        return k

    def shape(self, key: str | None) -> tuple[int, ...] | None:
        return None if key is None else tuple(self.shapes[key])

    def any_contains(self, *parts: str) -> str | None:
        return next((k for k in self.shapes if any(p in k for p in parts)), None)


def _shapes(model) -> dict[str, tuple[int, ...]]:
    if isinstance(model, Mapping):
        return {k: tuple(v) if not hasattr(v, "shape") else tuple(v.shape) for k, v in model.items()}
    if hasattr(model, "keys") and hasattr(model, "shape"):
        return {k: tuple(model.shape(k)) for k in model.keys()}
    raise ConfigError(f"detect_architecture needs a cq.model.ModelView or a mapping key -> shape/tensor, "
                      f"got {type(model).__name__}")


def _ev(k: _Keys, key: str) -> str:
    return f"{key} {list(k.shape(key))}"


def _lora(k: _Keys) -> Detection | None:
    hit = k.any_contains(".lora_up.", ".lora_down.", ".lora_A.", ".lora_B.", "lora_unet_", "lora_te",
                         ".hada_w1_a", ".lokr_w1")
    if hit is None:
        return None
    n = sum(1 for key in k.shapes if "lora" in key or ".hada_" in key or ".lokr_" in key)
    return Detection("lora", FAMILIES["lora"], (f"{n} LoRA/LyCORIS keys, e.g. {hit}",))


def _flux_like(k: _Keys) -> Detection | None:
    key_norm = k.anchor("double_blocks.0.img_attn.norm.key_norm.scale", "double_blocks.0.img_attn.norm.key_norm.weight")
    if key_norm is None:
        return None
    ev = [f"{key_norm} (Flux-style double blocks)"]
    img_in = k.has("img_in.weight")
    guidance = k.has("distilled_guidance_layer.norms.0.scale", "distilled_guidance_layer.norms.0.weight",
                     "distilled_guidance_layer.0.norms.0.scale", "distilled_guidance_layer.0.norms.0.weight")
    if img_in is None and guidance is None:
        return None
    mod = k.has("double_stream_modulation_img.lin.weight")
    if mod is not None:
        ev.append(f"{_ev(k, mod)}: shared stream modulation (Flux.2)")
        if img_in:
            ev.append(f"{_ev(k, img_in)}: hidden size {k.shape(img_in)[0]}")
        return Detection("flux2", FAMILIES["flux2"], tuple(ev), k.prefix)
    if guidance is not None:
        ev.append(f"{guidance}: distilled guidance layer (Chroma)")
        nerf = k.has("nerf_blocks.0.norm.scale", "nerf_blocks.0.norm.weight")
        if nerf is not None:
            ev.append(f"{nerf}: NeRF pixel head (Chroma Radiance)")
            if k.has("__x0__"):
                ev.append("__x0__ marker: x0 prediction")
            return Detection("chroma_radiance", FAMILIES["chroma_radiance"], tuple(ev), k.prefix)
        return Detection("chroma", FAMILIES["chroma"], tuple(ev), k.prefix)
    ev.append(f"{_ev(k, img_in)}: in_channels {k.shape(img_in)[1] // 4}, hidden {k.shape(img_in)[0]}")
    g = k.has("guidance_in.in_layer.weight")
    ev.append("guidance_in present (dev)" if g else "no guidance_in (schnell-style)")
    ev.append("cq has no Flux.1 preset: the generic rules keep norms, biases, embeddings and non-Linear tensors")
    return Detection("flux1", FAMILIES["flux1"], tuple(ev), k.prefix)


def _hunyuan(k: _Keys) -> Detection | None:
    a = k.anchor("txt_in.individual_token_refiner.blocks.0.norm1.weight")
    if a is None:
        return None
    ev = [f"{a} (HunyuanVideo token refiner)"]
    v15 = k.has("cond_type_embedding.weight", "vision_in.proj.0.weight")
    if v15:
        ev.append(f"{v15}: HunyuanVideo 1.5")
        return Detection("hunyuan_video_1.5", FAMILIES["hunyuan_video_1.5"], tuple(ev), k.prefix)
    ev.append("no cond_type_embedding/vision_in: HunyuanVideo 1.0 (the --hunyuan preset targets 1.5; its norm "
              "rules apply to both)")
    return Detection("hunyuan_video", FAMILIES["hunyuan_video"], tuple(ev), k.prefix)


def _wan(k: _Keys) -> Detection | None:
    a = k.anchor("head.modulation")
    if a is None:
        return None
    ev = [f"{_ev(k, a)}: Wan head modulation, dim {k.shape(a)[-1]}"]
    blocks = len({key[len(k.prefix) + 7:].split(".")[0] for key in k.shapes if key.startswith(k.prefix + "blocks.")})
    ev.append(f"{blocks} transformer blocks")
    if k.has("img_emb.proj.0.bias"):
        ev.append("img_emb present: image-to-video")
    return Detection("wan", FAMILIES["wan"], tuple(ev), k.prefix)


def _qwen_image(k: _Keys) -> Detection | None:
    a = k.anchor("transformer_blocks.0.img_mod.1.weight")
    if a is None or k.has("txt_norm.weight") is None:
        if a is not None:
            k.prefix = None
        return None
    ev = [f"{_ev(k, a)}: per-block image modulation", f"{k.prefix}txt_norm.weight: text RMS norm (Qwen-Image)"]
    return Detection("qwen_image", FAMILIES["qwen_image"], tuple(ev), k.prefix)


def _lumina(k: _Keys) -> Detection | None:
    a = k.anchor("cap_embedder.1.weight")
    if a is None or k.has("noise_refiner.0.attention.k_norm.weight") is None:
        if a is not None:
            k.prefix = None
        return None
    dim = k.shape(a)[0]
    ev = [f"{_ev(k, a)}: caption embedder (Lumina-2 family), dim {dim}"]
    if dim == 3840:
        ev.append("dim 3840: Z-Image (for a Z-Image refiner checkpoint choose --zimage_refiner)")
        return Detection("z_image", FAMILIES["z_image"], tuple(ev), k.prefix)
    ev.append(f"dim {dim}: Lumina 2 (no cq preset; generic rules)")
    return Detection("lumina2", FAMILIES["lumina2"], tuple(ev), k.prefix)


def _t5(k: _Keys) -> Detection | None:
    a = k.anchor("encoder.block.0.layer.0.SelfAttention.q.weight")
    if a is None:
        return None
    d = k.shape(a)[1]
    ev = [f"{_ev(k, a)}: T5 encoder, d_model {d}" + (" (T5-XXL)" if d == 4096 else "")]
    dec = k.any_contains("decoder.", "lm_head")
    if dec:
        ev.append(f"{dec}: decoder/lm_head tensors, removed by the t5xxl preset")
    return Detection("t5", FAMILIES["t5"], tuple(ev), k.prefix)


def _llm(k: _Keys) -> Detection | None:
    a = k.anchor("layers.0.self_attn.q_proj.weight")
    if a is None or k.has("layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight") is None:
        if a is not None:
            k.prefix = None
        return None
    emb = k.has("embed_tokens.weight")
    vocab = k.shape(emb)[0] if emb else None
    ev = [f"{_ev(k, a)}: decoder-only LLM layers"]
    if emb:
        ev.append(f"{_ev(k, emb)}: vocabulary {vocab}")
    if k.has("layers.0.self_attn.q_proj.bias"):
        ev.append("q_proj has a bias (Qwen2-style); the mistral preset's generic text-encoder rules apply")
        return Detection("llm_text_encoder", FAMILIES["llm_text_encoder"], tuple(ev), k.prefix)
    if k.has("layers.0.self_attn.q_norm.weight"):
        ev.append("per-head q_norm (Qwen3-style); the mistral preset's generic text-encoder rules apply")
        return Detection("llm_text_encoder", FAMILIES["llm_text_encoder"], tuple(ev), k.prefix)
    if vocab == 131072 or k.any_contains("tekken", "multi_modal_projector"):
        ev.append("Mistral vocabulary (131072, tekken)")
        return Detection("mistral", FAMILIES["mistral"], tuple(ev), k.prefix)
    ev.append("Llama-style layers; the mistral preset's generic text-encoder rules apply")
    return Detection("llm_text_encoder", FAMILIES["llm_text_encoder"], tuple(ev), k.prefix)


def _visual(k: _Keys) -> Detection | None:
    a = k.any_contains("visual.blocks.0.mlp.", "vision_tower.")
    if a is None:
        return None
    return Detection("visual", FAMILIES["visual"], (f"{a}: a vision encoder without LLM layers",))


_DETECTORS = (_lora, _hunyuan, _flux_like, _wan, _qwen_image, _lumina, _t5, _llm, _visual)


def detect_architecture(model) -> Detection:
    """The family of ``model`` (a :class:`cq.model.ModelView` or ``{key: shape or tensor}``), its presets and
    the evidence; ``Detection(None)`` with a note when nothing matches.

    Example:
        >>> detect_architecture({"fc.weight": (4, 4)}).describe()
        "architecture: not recognised; converting with cq's generic rules\\n  - no anchor of a known family among 1 keys"
    """
    shapes = _shapes(model)
    for det in _DETECTORS:
        k = _Keys(shapes)
        found = det(k)
        if found is not None:
            return found
    return Detection(None, (), (f"no anchor of a known family among {len(shapes)} keys",))


def resolve_presets(detection: Detection, *, chosen: Iterable[str] = (), auto: bool = True) -> tuple[tuple[str, ...], str]:
    """The presets a run applies and the line that says why.

    The user's ``chosen`` presets win (a note names the detected family when it differs); with
    ``auto=False`` (``--no-auto-preset``) none is added; otherwise the detected ones.

    Example:
        >>> d = Detection("wan", ("wan",), ("head.modulation [1, 6, 5120]",))
        >>> resolve_presets(d)
        (('wan',), 'auto preset: --wan (detected wan)')
        >>> resolve_presets(d, chosen=["qwen"])[1]
        'preset chosen: --qwen (detected wan, whose preset is --wan)'
    """
    chosen = tuple(chosen)
    unknown = [p for p in chosen if p not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown preset(s) {unknown}; valid presets are {list(PRESETS)}")
    fam = detection.family or "unknown"
    if chosen:
        msg = f"preset chosen: {', '.join('--' + p for p in chosen)}"
        if detection.presets and set(detection.presets) != set(chosen):
            msg += f" (detected {fam}, whose preset is {', '.join('--' + p for p in detection.presets)})"
        return chosen, msg
    if not auto:
        return (), f"auto preset off (detected {fam}); generic rules"
    if detection.family is None:
        return (), "architecture not recognised; generic rules"
    if not detection.presets:
        return (), f"detected {fam}: cq has no preset for it; generic rules"
    return detection.presets, f"auto preset: {', '.join('--' + p for p in detection.presets)} (detected {fam})"
