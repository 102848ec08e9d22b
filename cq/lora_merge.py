"""Merge LoRA files into a model during conversion, exactly as ComfyUI would apply them at runtime.

A model transform (:mod:`cq.model`): :func:`merge_loras` reads the LoRA files, maps every layer
prefix to a base tensor (or a slice of a fused one) with ComfyUI's forward key map
(:mod:`cq.lora.keymap`), and returns per touched tensor (weights and biases) one
``merge_lora_patches`` stage. The runner applies those stages to the float32 tensor, in the original
basis, before rotation and quantization, whether the tensor is then quantized or kept.

Strength of the i-th file (from 0): ``scale · 0.9**i`` with ``dampen`` (the reference tool's
default), ``scale`` without. ComfyUI itself never dampens: ``dampen=False`` gives exactly what
chaining LoRA loaders of strength ``scale`` gives.

Checks (where ComfyUI only logs, cq stops or reports):

* a LoRA of which no layer matches the model is an :class:`~cq.errors.InputError`;
* a patch whose shape does not fit its target is an :class:`~cq.errors.InputError` naming the key;
* two names of one file patching the same tensor (ComfyUI keeps one, silently) is an error;
* LoRA tensors that match nothing are listed in the report and summarised in a warning.

Example:
    >>> import torch
    >>> from cq.model import DictView
    >>> from cq.io.lora_file import lora_file_from_tensors
    >>> base = DictView({"diffusion_model.fc.weight": torch.zeros(2, 3), "diffusion_model.fc.bias": torch.zeros(2)})
    >>> lora = lora_file_from_tensors({"lora_unet_fc.lora_up.weight": torch.ones(2, 1),
    ...                                "lora_unet_fc.lora_down.weight": torch.ones(1, 3),
    ...                                "lora_unet_fc.diff_b": torch.ones(2), "te.x.lora_A.weight": torch.ones(1, 1)},
    ...                               name="style.safetensors")
    >>> edits = plan_lora_merge(base, [lora], scale=0.5)
    >>> sorted(edits.stages), edits.apply("diffusion_model.fc.bias", torch.zeros(2)).tolist()
    (['diffusion_model.fc.bias', 'diffusion_model.fc.weight'], [0.5, 0.5])
    >>> edits.report["lora"]["files"][0]["unmatched"], edits.warnings[0][:40]
    (['te.x.lora_A.weight'], "LoRA 'style.safetensors': 1 of 4 tensors")
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import attrs
import torch

from .errors import ConfigError, InputError
from .io.lora_file import LoraFile, read_lora_file
from .lora.keymap import BaseKeyMap, Target, comfy_key_map, convert_lora_names
from .lora.legacy import dampening
from .lora.patches import LoraPatch, patches_from_group
from .model import ModelEdits, ModelView
from .pipeline import stage
from .transforms.lora import LoraPatchesConfig, PatchEntry, merge_lora_patches

__all__ = ["LoraMergeConfig", "merge_loras", "plan_lora_merge", "lora_rows_for", "lora_config_from_options"]

#: How many unmatched names a warning shows (the report lists all of them).
_SHOWN = 5


def _paths(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        value = (value,)
    try:
        out = tuple(os.fspath(v) for v in value)
    except TypeError:
        raise ConfigError(f"LoRA paths must be a path or a sequence of paths, got {value!r}") from None
    return out


def _finite_number(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        raise ConfigError(f"{attribute.name}={value!r} must be a finite number (the LoRA strength, e.g. 1.0)")


@attrs.frozen
class LoraMergeConfig:
    """Which LoRA files to merge, at which strength, and whether the i-th is dampened by ``0.9**i``.

    Example:
        >>> LoraMergeConfig(("a.safetensors", "b.safetensors"), scale=0.5).strengths()
        (0.5, 0.45)
        >>> LoraMergeConfig(())
        Traceback (most recent call last):
        ...
        cq.errors.ConfigError: LoraMergeConfig needs at least one LoRA path (--merge-lora A or --merge-loras A B ...)
    """

    paths: tuple[str, ...] = attrs.field(converter=_paths)
    scale: float = attrs.field(default=1.0, validator=_finite_number)
    dampen: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

    @paths.validator
    def _some(self, attribute, value):
        if not value:
            raise ConfigError("LoraMergeConfig needs at least one LoRA path (--merge-lora A or --merge-loras A B ...)")
        if any(not p for p in value):
            raise ConfigError(f"LoRA paths must be non-empty strings, got {list(value)!r}")

    def strengths(self) -> tuple[float, ...]:
        """The strength of each file, in order: ``scale · 0.9**i`` (dampened) or ``scale``."""
        return tuple(float(self.scale) * dampening(i, self.dampen) for i in range(len(self.paths)))


def lora_config_from_options(merge_lora_path: str | None = None, merge_lora_paths: Sequence[str] | None = None,
                             merge_lora_scale: float = 1.0, merge_lora_dampen: bool = True) -> LoraMergeConfig | None:
    """The reference API's four options as a :class:`LoraMergeConfig` (``None`` when no path is given).

    ``merge_lora_path`` comes first, then ``merge_lora_paths`` (a path given twice is an error: it
    would be merged twice).

    Example:
        >>> lora_config_from_options("a.safetensors", ["b.safetensors"], 0.5).paths
        ('a.safetensors', 'b.safetensors')
        >>> lora_config_from_options() is None
        True
    """
    paths = ([merge_lora_path] if merge_lora_path else []) + list(merge_lora_paths or [])
    if not paths:
        return None
    dup = sorted({p for p in paths if paths.count(p) > 1})
    if dup:
        raise ConfigError(f"LoRA file(s) {dup} given twice (merge_lora_path and merge_lora_paths together); "
                          "each file would be merged twice. Give each once")
    return LoraMergeConfig(tuple(paths), scale=merge_lora_scale, dampen=merge_lora_dampen)


# ---------------------------------------------------------------------------------------------


def _bias_target(view: ModelView, target: Target, keys: set[str]) -> Target | None:
    """The bias of a weight target (same slice and function), if the model has one."""
    if not target.key.endswith(".weight"):
        return None
    key = target.key[: -len(".weight")] + ".bias"
    return attrs.evolve(target, key=key) if key in keys else None


def _shape(view: ModelView, t: Target) -> tuple[int, ...]:
    shape = tuple(view.shape(t.key))
    if t.offset is None:
        return shape
    d, a, n = t.offset
    if d >= len(shape) or a + n > shape[d]:
        raise InputError(f"{t.describe()}: the slice lies outside the base tensor {list(shape)}")
    return shape[:d] + (n,) + shape[d + 1:]


def _file_plan(view: ModelView, keymap: BaseKeyMap, f: LoraFile, strength: float, keys: set[str]):
    """Per-file: (entries by base key, report dict, warning or None)."""
    rename = convert_lora_names(f.tensors)
    if rename:
        f = f.renamed(rename)
    names = f.group_keys
    entries: dict[str, list[PatchEntry]] = {}
    claimed: dict[tuple, str] = {}
    matched: dict[str, str] = {}
    kinds: dict[str, int] = {}
    unmatched: list[str] = list(f.ungrouped)
    for prefix, group in f.groups.items():
        target = keymap.get(prefix)
        if target is None:
            unmatched += sorted(names[prefix].values())
            continue
        weight, bias, used = patches_from_group(prefix, group)
        unmatched += sorted(names[prefix][s] for s in set(group) - used)
        pairs: list[tuple[Target, LoraPatch]] = []
        if weight is not None:
            pairs.append((target, weight))
        if bias is not None:
            bt = _bias_target(view, target, keys)
            if bt is None:
                # ComfyUI would patch "<stem>.bias" only if the model had one; it has none here
                unmatched.append(names[prefix][".diff_b" if ".diff_b" in group else ".b_norm"])
            else:
                pairs.append((bt, bias))
        for t, patch in pairs:
            patch.check(_shape(view, t))
            where = (t.key, t.offset)
            if where in claimed:
                raise InputError(f"LoRA {f.name!r}: {claimed[where]!r} and {prefix!r} both patch {t.describe()}; "
                                 "ComfyUI would silently apply only one of them. Remove one from the file")
            claimed[where] = prefix
            entries.setdefault(t.key, []).append(PatchEntry(patch, strength, t.offset, t.function, f.name))
            kinds[patch.kind] = kinds.get(patch.kind, 0) + 1
        matched[prefix] = target.describe()
    report = {"file": f.name, "path": f.path, "strength": strength, "architecture": keymap.architecture,
              "matched_layers": len(matched), "patches": kinds, "targets": matched, "unmatched": unmatched}
    warning = None
    if unmatched:
        shown = ", ".join(unmatched[:_SHOWN]) + (f", ... ({len(unmatched) - _SHOWN} more)"
                                                 if len(unmatched) > _SHOWN else "")
        warning = (f"LoRA {f.name!r}: {len(unmatched)} of {len(f.tensors)} tensors match no tensor of the model "
                   f"and are NOT merged: {shown} (ComfyUI would log them as 'lora key not loaded'; the report "
                   "lists them all)")
    if not matched:
        raise InputError(
            f"LoRA {f.name!r}: none of its {len(f.groups)} layer names matches the model "
            f"({keymap.architecture} layout, {len(keymap)} known LoRA names); e.g. {sorted(f.groups)[:3]}. "
            "The LoRA was trained for another model, or its key format is not one ComfyUI loads")
    if not entries:
        raise InputError(f"LoRA {f.name!r}: its matching layers hold no patch (only alpha values); nothing to merge")
    return entries, report, warning


def plan_lora_merge(view: ModelView, loras: Sequence[LoraFile], *, scale: float = 1.0, dampen: bool = True,
                    keymap: BaseKeyMap | None = None) -> ModelEdits:
    """The edits that merge already-read LoRA files into ``view``'s tensors (no I/O; see :func:`merge_loras`)."""
    if not loras:
        raise ConfigError("plan_lora_merge needs at least one LoRA file")
    keymap = keymap or comfy_key_map(view)
    keys = set(view.keys())
    per_key: dict[str, list[PatchEntry]] = {}
    files, warnings = [], []
    for i, f in enumerate(loras):
        strength = float(scale) * dampening(i, dampen)
        entries, report, warning = _file_plan(view, keymap, f, strength, keys)
        for k, v in entries.items():
            per_key.setdefault(k, []).extend(v)
        files.append(report)
        if warning:
            warnings.append(warning)
    stages = {k: (stage(merge_lora_patches, LoraPatchesConfig(tuple(v))),) for k, v in per_key.items()}
    report = {"lora": {"scale": float(scale), "dampen": bool(dampen), "architecture": keymap.architecture,
                       "tensors_patched": len(stages), "files": files}}
    return ModelEdits(stages=stages, warnings=tuple(warnings), report=report)


def merge_loras(view: ModelView, *, cfg: LoraMergeConfig) -> ModelEdits:
    """Model transform: read ``cfg.paths`` and return the edits that merge them (see the module doc).

    Raises:
        InputError: an unreadable file, a LoRA that matches nothing, a shape mismatch (the message
            names the LoRA key), two names patching one tensor, unsupported adapters (GLoRA, OFT,
            output-axis DoRA, control LoRAs that reshape weights).
    """
    return plan_lora_merge(view, [read_lora_file(p) for p in cfg.paths], scale=cfg.scale, dampen=cfg.dampen)


def lora_rows_for(view: ModelView, lora: str | os.PathLike | LoraFile) -> dict[str, torch.Tensor]:
    """``{base weight key: LoRA down/A rows [r, K]}`` for the synthetic-Hessian calibration LoRA.

    Each plain-LoRA layer is matched to its base weight with the same key map as the merge (a
    fused-slice layer contributes rows to the fused weight: its ``A`` acts on the same inputs); the
    rows of several layers on one weight are stacked. Other adapter kinds carry no input rows and
    are skipped. A layer whose ``A`` does not have the weight's ``K`` columns is an
    :class:`~cq.errors.InputError`.

    Example:
        >>> from cq.model import DictView
        >>> from cq.io.lora_file import lora_file_from_tensors
        >>> view = DictView({"blocks.0.fc.weight": torch.zeros(4, 3)})
        >>> f = lora_file_from_tensors({"diffusion_model.blocks.0.fc.lora_A.weight": torch.ones(2, 3),
        ...                             "diffusion_model.blocks.0.fc.lora_B.weight": torch.ones(4, 2)})
        >>> {k: list(v.shape) for k, v in lora_rows_for(view, f).items()}
        {'blocks.0.fc.weight': [2, 3]}
    """
    f = lora if isinstance(lora, LoraFile) else read_lora_file(lora)
    rename = convert_lora_names(f.tensors)
    if rename:
        f = f.renamed(rename)
    keymap = comfy_key_map(view)
    rows: dict[str, list[torch.Tensor]] = {}
    for prefix, group in f.groups.items():
        target = keymap.get(prefix)
        if target is None:
            continue
        weight, _, _ = patches_from_group(prefix, group)
        if weight is None or weight.kind != "lora":
            continue
        down = weight.tensors["down"].detach().to(torch.float32).flatten(1)
        k = int(torch.Size(view.shape(target.key)[1:]).numel())
        if down.shape[1] != k:
            raise InputError(f"calibration LoRA {f.name!r}: {prefix!r} has A {list(down.shape)} but its base weight "
                             f"{target.key!r} has {k} input columns; the LoRA belongs to another model")
        rows.setdefault(target.key, []).append(down)
    return {k: torch.cat(v, dim=0) for k, v in rows.items()}
