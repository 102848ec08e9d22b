"""Which base tensor a LoRA layer prefix patches: the map ComfyUI builds forward from the model's keys.

ComfyUI never parses LoRA names. It lists, for every tensor of the loaded model, the names trainers
give that tensor (``comfy/lora.py: model_lora_keys_unet`` with the diffusers tables of
``comfy/utils.py``), and looks each LoRA prefix up in that list. This module builds the same list
from a base *file*: the architecture is recognised from its keys (as ComfyUI's model detection
does), the ``model.diffusion_model.`` / ``diffusion_model.`` prefix of the file is normalised away
and put back on the targets, and only targets that exist in the file are kept.

Entries per architecture (``X`` = a native key without ``.weight``, ``D`` = a diffusers name):

* every model: ``lora_unet_{X with . → _}``, ``diffusion_model.X`` (and ``diffusion_model.K`` for a
  key ``K`` that does not end in ``.weight``);
* SD1/SDXL UNets: ``lora_unet_``/``lycoris_`` + ``D`` with ``_``, and ``D``/``unet.D`` with the old
  attention-processor spelling (``.to_q`` → ``.processor.to_q``, ``.to_out.0`` → ``.processor.to_out``);
* SD3-style MMDiT: ``transformer.D``, ``base_model.model.D``, ``lora_transformer_D_``, ``lycoris_D_``;
  the diffusers ``to_q/to_k/to_v`` and ``add_*_proj`` are row slices of the fused ``qkv``;
* Flux / Flux-2: ``transformer.D``, ``lycoris_D_``, ``lora_transformer_D_``, bare ``D`` (DiffSynth),
  with the fused slices (``to_q/k/v`` → ``img_attn.qkv``, ``add_*_proj`` → ``txt_attn.qkv``, single
  blocks' ``to_q/k/v`` and ``proj_mlp`` → ``linear1``), ``norm_out.linear`` with its halves swapped,
  and ``diffusion_model.single_blocks.N.linear1_qkv`` for rows ``[0, 3H)``;
* Qwen-Image: bare ``X``, ``transformer.X``, ``lycoris_X_``;
* Z-Image / Lumina 2: ``diffusion_model.D``, ``transformer.D``, ``lycoris_D_``, bare ``D``, with the
  diffusers ``attention.to_q/k/v`` as slices of the fused ``attention.qkv``;
* Wan: the generic entries only (as in ComfyUI), plus Wan-Fun's ``lora_unet__`` spelling
  (``comfy/lora_convert.py``), handled by :func:`convert_lora_names`.

Example:
    >>> import torch
    >>> from cq.model import DictView
    >>> H = 4
    >>> view = DictView({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3 * H, H),
    ...                  "img_in.weight": torch.zeros(H, 2)})
    >>> m = comfy_key_map(view)
    >>> m.architecture, m["transformer.transformer_blocks.0.attn.to_k"]
    ('flux', Target(key='double_blocks.0.img_attn.qkv.weight', offset=(0, 4, 4), function=None))
    >>> m["lora_unet_double_blocks_0_img_attn_qkv"].key
    'double_blocks.0.img_attn.qkv.weight'
"""

from __future__ import annotations

import re
import types
from typing import Any, Iterable, Mapping

import attrs
import torch


__all__ = ["Target", "BaseKeyMap", "comfy_key_map", "model_prefix", "detect_architecture", "convert_lora_names",
           "swap_scale_shift", "FUNCTIONS"]


def swap_scale_shift(t: torch.Tensor) -> torch.Tensor:
    """Swap the two halves of dim 0 (diffusers orders AdaLN's shift/scale the other way round).

    Example:
        >>> swap_scale_shift(torch.arange(4.0)).tolist()
        [2.0, 3.0, 0.0, 1.0]
    """
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


#: Functions a map entry may apply to a patch's delta, by name (kept by name so configs stay plain data).
FUNCTIONS = types.MappingProxyType({"swap_scale_shift": swap_scale_shift})


@attrs.frozen
class Target:
    """A base tensor a LoRA prefix patches: its key in the base file, an optional slice, a function.

    ``offset = (dim, start, length)``: the patch applies to ``weight.narrow(dim, start, length)``
    (a slice of a fused weight). ``function`` names a :data:`FUNCTIONS` entry applied to the delta.
    """

    key: str
    offset: tuple[int, int, int] | None = None
    function: str | None = None

    def describe(self) -> str:
        s = self.key
        if self.offset is not None:
            d, a, n = self.offset
            s += f"[{'rows' if d == 0 else f'dim {d}'} {a}:{a + n}]"
        if self.function:
            s += f" ({self.function})"
        return s


@attrs.frozen
class BaseKeyMap:
    """LoRA prefix → :class:`Target`, for one base file; ``prefix`` is how the file names its keys."""

    architecture: str
    prefix: str
    targets: Mapping[str, Target] = attrs.field(converter=lambda d: types.MappingProxyType(dict(d)), repr=False)

    def __getitem__(self, lora_prefix: str) -> Target:
        return self.targets[lora_prefix]

    def __contains__(self, lora_prefix: object) -> bool:
        return lora_prefix in self.targets

    def get(self, lora_prefix: str) -> Target | None:
        return self.targets.get(lora_prefix)

    def __len__(self) -> int:
        return len(self.targets)


# ---------------------------------------------------------------------------------------------
# Base file layout


def model_prefix(keys: Iterable[str]) -> str:
    """The prefix of a file's diffusion-model keys: ``model.diffusion_model.``, ``diffusion_model.`` or ``""``.

    Example:
        >>> model_prefix(["model.diffusion_model.x.weight", "first_stage_model.y"]), model_prefix(["x.weight"])
        ('model.diffusion_model.', '')
    """
    keys = list(keys)
    for p in ("model.diffusion_model.", "diffusion_model."):
        if any(k.startswith(p) for k in keys):
            return p
    return ""


def _blocks(native: Iterable[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in native if (m := rx.match(k))})


def detect_architecture(native: Iterable[str]) -> str:
    """``flux``, ``mmdit``, ``qwen_image``, ``lumina2``, ``wan``, ``unet`` or ``generic``, from native key names.

    Example:
        >>> detect_architecture(["joint_blocks.0.x_block.attn.qkv.weight"])
        'mmdit'
    """
    n = set(native)
    if "double_blocks.0.img_attn.qkv.weight" in n or "single_blocks.0.linear1.weight" in n:
        return "flux"
    if "joint_blocks.0.x_block.attn.qkv.weight" in n or "joint_blocks.0.context_block.attn.qkv.weight" in n:
        return "mmdit"
    if "txt_norm.weight" in n and "transformer_blocks.0.attn.to_q.weight" in n:
        return "qwen_image"
    if "layers.0.attention.qkv.weight" in n and ("cap_embedder.1.weight" in n or "noise_refiner.0.attention.qkv.weight" in n):
        return "lumina2"
    if "blocks.0.self_attn.q.weight" in n or "patch_embedding.weight" in n:
        return "wan"
    if "input_blocks.0.0.weight" in n:
        return "unet"
    return "generic"


# ---------------------------------------------------------------------------------------------
# diffusers name → native name tables (facts about the two naming schemes, per architecture)

_FLUX_DOUBLE = {
    "attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_FLUX_SINGLE = {
    "norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm", "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
}
_FLUX_BASIC = {
    "proj_out": "final_layer.linear", "x_embedder": "img_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "context_embedder": "txt_in",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "controlnet_x_embedder": "pos_embed_input",
}


def _flux_diffusers(native: set[str], hidden: int) -> dict[str, Target]:
    """diffusers weight stem → target (native ``.weight`` key), as ``comfy/utils.py: flux_to_diffusers``."""
    out: dict[str, Target] = {}
    h = hidden
    for i in _blocks(native, r"double_blocks\.(\d+)\."):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, q in enumerate(("q", "k", "v")):
            out[f"{src}.attn.to_{q}"] = Target(f"{dst}.img_attn.qkv.weight", (0, j * h, h))
            out[f"{src}.attn.add_{q}_proj"] = Target(f"{dst}.txt_attn.qkv.weight", (0, j * h, h))
        for d, nat in _FLUX_DOUBLE.items():
            out[f"{src}.{d}"] = Target(f"{dst}.{nat}.weight")
    for i in _blocks(native, r"single_blocks\.(\d+)\."):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, q in enumerate(("q", "k", "v")):
            out[f"{src}.attn.to_{q}"] = Target(f"{dst}.linear1.weight", (0, j * h, h))
        # ComfyUI takes 4H rows for proj_mlp (Flux.1's mlp_ratio); a model with another ratio fails the
        # shape check instead of being patched wrongly.
        out[f"{src}.proj_mlp"] = Target(f"{dst}.linear1.weight", (0, 3 * h, 4 * h))
        for d, nat in _FLUX_SINGLE.items():
            out[f"{src}.{d}"] = Target(f"{dst}.{nat}.weight")
    for d, nat in _FLUX_BASIC.items():
        out[d] = Target(f"{nat}.weight")
    out["norm_out.linear"] = Target("final_layer.adaLN_modulation.1.weight", None, "swap_scale_shift")
    return out


_MMDIT_BLOCK = {
    "norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
}
_MMDIT_BASIC = {
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
}


def _mmdit_diffusers(native: set[str], hidden: int | None) -> dict[str, Target]:
    """As ``comfy/utils.py: mmdit_to_diffusers``; ComfyUI's ``depth`` is ``hidden // 64``."""
    out: dict[str, Target] = {}
    hidden = hidden or 0
    depth = hidden // 64
    for i in _blocks(native, r"joint_blocks\.(\d+)\."):
        src, dst = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for j, q in enumerate(("q", "k", "v")):
            out[f"{src}.attn.to_{q}"] = Target(f"{dst}.x_block.attn.qkv.weight", (0, j * hidden, hidden))
            out[f"{src}.attn.add_{q}_proj"] = Target(f"{dst}.context_block.attn.qkv.weight", (0, j * hidden, hidden))
        for d, nat in _MMDIT_BLOCK.items():
            out[f"{src}.{d}"] = Target(f"{dst}.{nat}.weight")
    for d, nat in _MMDIT_BASIC.items():
        out[d] = Target(f"{nat}.weight")
    out["norm_out.linear"] = Target("final_layer.adaLN_modulation.1.weight", None, "swap_scale_shift")
    # the last block's context modulation is stored swapped as well
    if depth:
        out[f"transformer_blocks.{depth - 1}.norm1_context.linear"] = Target(
            f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1.weight", None, "swap_scale_shift")
    return out


_LUMINA_BLOCK = ("attention.norm_q:attention.q_norm", "attention.norm_k:attention.k_norm",
                 "attention.to_out.0:attention.out", "attention_norm1:attention_norm1",
                 "attention_norm2:attention_norm2", "feed_forward.w1:feed_forward.w1",
                 "feed_forward.w2:feed_forward.w2", "feed_forward.w3:feed_forward.w3", "ffn_norm1:ffn_norm1",
                 "ffn_norm2:ffn_norm2", "adaLN_modulation.0:adaLN_modulation.0")
_LUMINA_BASIC = {"all_final_layer.2-1.linear": "final_layer.linear",
                 "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
                 "all_x_embedder.2-1": "x_embedder", "cap_embedder.0": "cap_embedder.0",
                 "cap_embedder.1": "cap_embedder.1", "t_embedder.mlp.0": "t_embedder.mlp.0",
                 "t_embedder.mlp.2": "t_embedder.mlp.2"}


def _lumina_diffusers(native: set[str], hidden: int | None) -> dict[str, Target]:
    """As ``comfy/utils.py: z_image_to_diffusers`` (Z-Image / Lumina 2): q/k/v are slices of ``attention.qkv``."""
    out: dict[str, Target] = {}
    h = hidden or 0
    groups = [("layers", _blocks(native, r"layers\.(\d+)\."))]
    # ComfyUI maps two refiner blocks of each kind (its default n_refiner_layers)
    groups += [("context_refiner", [0, 1]), ("noise_refiner", [0, 1])]
    for name, idx in groups:
        for i in idx:
            b = f"{name}.{i}"
            for j, q in enumerate(("q", "k", "v")):
                out[f"{b}.attention.to_{q}"] = Target(f"{b}.attention.qkv.weight", (0, j * h, h))
            for pair in _LUMINA_BLOCK:
                d, nat = pair.split(":")
                out[f"{b}.{d}"] = Target(f"{b}.{nat}.weight")
    for d, nat in _LUMINA_BASIC.items():
        out[d] = Target(f"{nat}.weight")
    return out


_UNET_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_UNET_ATTN = ("proj_in", "proj_out", "norm")
_UNET_TBLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_UNET_BASIC = {
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
}


def _unet_diffusers(native: set[str]) -> dict[str, Target]:
    """As ``comfy/utils.py: unet_to_diffusers``, with the UNet config read off the file's keys."""
    def n_transformers(block: str) -> int:
        return len(_blocks(native, re.escape(block) + r"\.1\.transformer_blocks\.(\d+)\."))

    # input blocks after conv_in, split into levels at the downsamplers (``input_blocks.n.0.op``)
    levels: list[list[int]] = [[]]
    for n in _blocks(native, r"input_blocks\.(\d+)\."):
        if n == 0:
            continue
        if f"input_blocks.{n}.0.op.weight" in native:
            levels.append([])
        else:
            levels[-1].append(n)
    levels = [lv for lv in levels if lv]
    out: dict[str, Target] = {}
    w = ".weight"
    n = 0
    for x, level in enumerate(levels):
        for i, n in enumerate(level):
            for nat, d in _UNET_RESNET.items():
                out[f"down_blocks.{x}.resnets.{i}.{d}"] = Target(f"input_blocks.{n}.0.{nat}{w}")
            t = n_transformers(f"input_blocks.{n}")
            if t:
                for b in _UNET_ATTN:
                    out[f"down_blocks.{x}.attentions.{i}.{b}"] = Target(f"input_blocks.{n}.1.{b}{w}")
                for j in range(t):
                    for b in _UNET_TBLOCK:
                        out[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{j}.{b}"] = Target(
                            f"input_blocks.{n}.1.transformer_blocks.{j}.{b}{w}")
        out[f"down_blocks.{x}.downsamplers.0.conv"] = Target(f"input_blocks.{n + 1}.0.op{w}")
    for b in _UNET_ATTN:
        out[f"mid_block.attentions.0.{b}"] = Target(f"middle_block.1.{b}{w}")
    for j in range(n_transformers("middle_block")):
        for b in _UNET_TBLOCK:
            out[f"mid_block.attentions.0.transformer_blocks.{j}.{b}"] = Target(
                f"middle_block.1.transformer_blocks.{j}.{b}{w}")
    for i, m in enumerate((0, 2)):
        for nat, d in _UNET_RESNET.items():
            out[f"mid_block.resnets.{i}.{d}"] = Target(f"middle_block.{m}.{nat}{w}")
    # output blocks: levels in reverse, each with one more resnet than its input level
    n = 0
    for x, level in enumerate(reversed(levels)):
        count = len(level) + 1
        for i in range(count):
            for nat, d in _UNET_RESNET.items():
                out[f"up_blocks.{x}.resnets.{i}.{d}"] = Target(f"output_blocks.{n}.0.{nat}{w}")
            c = 1
            t = n_transformers(f"output_blocks.{n}")
            if t:
                c += 1
                for b in _UNET_ATTN:
                    out[f"up_blocks.{x}.attentions.{i}.{b}"] = Target(f"output_blocks.{n}.1.{b}{w}")
                for j in range(t):
                    for b in _UNET_TBLOCK:
                        out[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{j}.{b}"] = Target(
                            f"output_blocks.{n}.1.transformer_blocks.{j}.{b}{w}")
            if i == count - 1:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = Target(f"output_blocks.{n}.{c}.conv{w}")
            n += 1
    for d, nat in _UNET_BASIC.items():
        out[d] = Target(f"{nat}{w}")
    return out


# ---------------------------------------------------------------------------------------------


def _hidden(view, prefix: str, key: str) -> int | None:
    """Rows of ``key`` (the hidden size); ``None`` when the view cannot say (then no fused slices are mapped)."""
    try:
        return int(view.shape(prefix + key)[0])
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _without_slices(m: dict[str, Target], hidden: int | None) -> dict[str, Target]:
    return m if hidden else {k: t for k, t in m.items() if t.offset is None}


def comfy_key_map(view: Any) -> BaseKeyMap:
    """Build ComfyUI's LoRA key map for a base model (a :class:`~cq.model.ModelView`: keys + shapes).

    Only targets that exist in the file are kept; targets carry the file's own key spelling. The
    hidden size that locates fused slices is read from the header (``img_in`` for Flux,
    ``x_embedder.proj`` for SD3); a view without shapes gets no slice entries.
    """
    keys = list(view.keys())
    prefix = model_prefix(keys)
    native = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    nset = set(native)
    arch = detect_architecture(nset)
    m: dict[str, Target] = {}

    def put(name: str, t: Target) -> None:
        m[name] = t

    for x in native:
        if x.endswith(".weight"):
            stem = x[: -len(".weight")]
            put("lora_unet_" + stem.replace(".", "_"), Target(x))
            put("diffusion_model." + stem, Target(x))
        else:
            put("diffusion_model." + x, Target(x))

    if arch == "unet":
        for d, t in _unet_diffusers(nset).items():
            und = d.replace(".", "_")
            put("lora_unet_" + und, t)
            put("lycoris_" + und, t)
            proc = d.replace(".to_", ".processor.to_")
            if proc.endswith(".to_out.0"):
                proc = proc[:-2]
            for p in ("", "unet."):
                put(p + proc, t)
    elif arch == "mmdit":
        hidden = _hidden(view, prefix, "x_embedder.proj.weight")
        for d, t in _without_slices(_mmdit_diffusers(nset, hidden), hidden).items():
            put("transformer." + d, t)
            put("base_model.model." + d, t)
            put("lora_transformer_" + d.replace(".", "_"), t)
            put("lycoris_" + d.replace(".", "_"), t)
    elif arch == "flux":
        hidden = _hidden(view, prefix, "img_in.weight")
        for d, t in _without_slices(_flux_diffusers(nset, hidden or 0), hidden).items():
            put("transformer." + d, t)
            put("lycoris_" + d.replace(".", "_"), t)
            put("lora_transformer_" + d.replace(".", "_"), t)
            put(d, t)
        for x in native if hidden else ():
            if x.endswith(".weight") and ".linear1." in x:
                put("diffusion_model." + x.replace(".linear1.weight", ".linear1_qkv"), Target(x, (0, 0, 3 * hidden)))
    elif arch == "lumina2":
        hidden = _hidden(view, prefix, "x_embedder.weight")
        for d, t in _without_slices(_lumina_diffusers(nset, hidden), hidden).items():
            put("diffusion_model." + d, t)
            put("transformer." + d, t)
            put("lycoris_" + d.replace(".", "_"), t)
            put(d, t)
    elif arch == "qwen_image":
        for x in native:
            if x.endswith(".weight"):
                stem = x[: -len(".weight")]
                put(stem, Target(x))
                put("transformer." + stem, Target(x))
                put("lycoris_" + stem.replace(".", "_"), Target(x))

    targets = {name: attrs.evolve(t, key=native[t.key]) for name, t in m.items() if t.key in native}
    return BaseKeyMap(architecture=arch, prefix=prefix, targets=targets)


def convert_lora_names(names: Iterable[str]) -> dict[str, str]:
    """Renames ComfyUI applies to a whole LoRA file before mapping (``comfy/lora_convert.py``): ``{old: new}``.

    Only the Wan-Fun spelling ``lora_unet__`` → ``lora_unet_`` is handled; the other conversions of
    that file (BFL control LoRAs, USO, TwinFlow) are for formats cq refuses or does not map.

    Example:
        >>> convert_lora_names(["lora_unet__blocks_0_cross_attn_k.lora_down.weight", "x.alpha"])
        {'lora_unet__blocks_0_cross_attn_k.lora_down.weight': 'lora_unet_blocks_0_cross_attn_k.lora_down.weight'}
    """
    names = list(names)
    if "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in names:
        return {k: "lora_unet_" + k[len("lora_unet__"):] for k in names if k.startswith("lora_unet__")}
    return {}
