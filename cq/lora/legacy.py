"""The reference tool's LoRA API (``load_lora_for_merging`` ...), kept working on top of cq's one patch model.

A LoRA adds ``ΔW = scale · (alpha / rank) · B @ A`` to a weight ``W`` [N, K], with ``A`` [r, K]
(``lora_A`` / ``lora_down``) and ``B`` [N, r] (``lora_B`` / ``lora_up``).

These functions keep the reference's names and return shapes; underneath they use the same file
reader (:func:`cq.io.lora_file.read_lora_file`), patch model (:mod:`cq.lora.patches`) and key map
(:mod:`cq.lora.keymap`) as the conversion's merge (:func:`cq.lora_merge.merge_loras`). Differences
from the reference, all deliberate:

* ``alpha`` comes from the ``<stem>.alpha`` tensor, else equals ``rank`` (a scale of 1), exactly as
  ComfyUI reads it; the reference read header metadata and ignored the tensors.
* Several LoRAs are dampened once, by ``0.9**i`` for the i-th (see :func:`merge_multiple_loras`).
* The merge never modifies its inputs and accumulates in float32 (float64 for float64 weights).
* :func:`lora_key_map` matches names with ComfyUI's forward key map, not by stripping prefixes.
* A half pair, mismatched ranks, or a missing file is an :class:`~cq.errors.InputError`; layers that
  are not plain 2-D LoRA (LoHa, LoKr, DoRA, ``.diff``, LoCon) are left out with a warning: merge
  them with :func:`cq.lora_merge.merge_loras`.
"""

from __future__ import annotations

import math
import os
import types
import warnings
from typing import Any, Iterable, Mapping, Sequence

import attrs
import torch

from ..errors import InputError
from ..io.lora_file import read_lora_file
from .keymap import comfy_key_map
from .patches import patches_from_group

__all__ = [
    "DAMPEN_BASE",
    "load_lora_tensors",
    "load_lora_for_merging",
    "load_multiple_loras_for_merging",
    "lora_delta",
    "check_lora_fits",
    "merge_lora_into_weight",
    "merge_multiple_loras",
    "dampening",
    "LoraKeyMap",
    "lora_key_map",
]

#: The i-th LoRA merged into one layer is dampened by ``DAMPEN_BASE ** i`` (when dampening is on).
DAMPEN_BASE = 0.9


# ---------------------------------------------------------------------------------------------
# Loading


def _warn_left_out(name: str, left: Sequence[str]) -> None:
    if not left:
        return
    shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
    warnings.warn(
        f"LoRA {name!r}: {len(left)} tensor(s) are not plain lora_A/lora_B/alpha matrices and are NOT returned: "
        f"{shown} (cq.lora_merge.merge_loras merges LoHa, LoKr, DoRA and diffs as ComfyUI does)",
        UserWarning, stacklevel=3,
    )


def load_lora_for_merging(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Load a LoRA file as ``{stem: {"lora_A", "lora_B", "alpha", "rank", "alpha_source"}}``.

    ``stem`` is the file's layer prefix (the key without ``.lora_A.weight``, ``.lora_down.weight``
    or another spelling ComfyUI accepts; no prefix is removed). ``alpha`` is a float from the
    ``<stem>.alpha`` tensor (``alpha_source == "tensor"``), else ``rank`` (``"rank"``: a scale of 1,
    as ComfyUI). ``rank = lora_A.shape[0]``.

    Raises:
        InputError: missing or unreadable file, an A without its B (or the reverse), ranks that
            disagree between A and B.

    Example:
        >>> import tempfile, torch, safetensors.torch as st
        >>> tmp = tempfile.TemporaryDirectory()
        >>> p = tmp.name + "/l.safetensors"
        >>> st.save_file({"lora_unet_fc.lora_down.weight": torch.ones(2, 4),
        ...               "lora_unet_fc.lora_up.weight": torch.ones(3, 2),
        ...               "lora_unet_fc.alpha": torch.tensor(1.0)}, p)
        >>> e = load_lora_for_merging(p)["lora_unet_fc"]
        >>> e["rank"], e["alpha"], e["alpha_source"]
        (2, 1.0, 'tensor')
        >>> tmp.cleanup()
    """
    f = read_lora_file(path)
    keys = f.group_keys
    out: dict[str, dict[str, Any]] = {}
    left: list[str] = list(f.ungrouped)
    for prefix, group in f.groups.items():
        weight, bias, used = patches_from_group(prefix, group)
        plain = (weight is not None and weight.kind == "lora" and "mid" not in weight.tensors
                 and weight.dora_scale is None and bias is None)
        if not plain:
            left += [keys[prefix][s] for s in sorted(group) if s != ".alpha" or weight is not None]
            continue
        left += [keys[prefix][s] for s in sorted(set(group) - used)]
        a, b = weight.tensors["down"], weight.tensors["up"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"LoRA {f.name!r}: layer {prefix!r} has A {list(a.shape)} and B {list(b.shape)}; "
                             "expected A [rank, in] and B [out, rank] with the same rank")
        rank = int(a.shape[0])
        alpha, source = (weight.alpha, "tensor") if weight.alpha is not None else (float(rank), "rank")
        out[prefix] = {"lora_A": a, "lora_B": b, "alpha": alpha, "rank": rank, "alpha_source": source}
    _warn_left_out(f.name, left)
    return out


def load_lora_tensors(path: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """``{stem: A}`` (the down/A matrices ``[rank, in]``) of a LoRA file; ``{}`` for an empty path.

    To find the base layer of each ``A`` use :func:`cq.lora_merge.lora_rows_for`, which matches names
    exactly as ComfyUI does.
    """
    if not path:
        return {}
    return {stem: e["lora_A"] for stem, e in load_lora_for_merging(path).items()}


def load_multiple_loras_for_merging(paths: Iterable[str | os.PathLike]) -> dict[str, list[dict[str, Any]]]:
    """``{stem: [entry, ...]}`` over several LoRA files, in path order; each entry gets ``"source"``.

    Unlike the reference, a missing path is an :class:`~cq.errors.InputError`, not skipped.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        for stem, entry in load_lora_for_merging(path).items():
            out.setdefault(stem, []).append({**entry, "source": os.path.basename(os.fspath(path))})
    return out


# ---------------------------------------------------------------------------------------------
# Merging


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def dampening(i: int, dampen: bool = True) -> float:
    """The factor of the ``i``-th (from 0) LoRA merged into a layer: ``0.9**i``, or 1 when off.

    Example:
        >>> [round(dampening(i), 3) for i in range(3)], dampening(2, dampen=False)
        ([1.0, 0.9, 0.81], 1.0)
    """
    return DAMPEN_BASE ** i if dampen else 1.0


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, rank: int, scale: float = 1.0, *,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
               name: str = "LoRA") -> torch.Tensor:
    """``scale · (alpha / rank) · B @ A`` as a new ``dtype`` tensor [N, K] (inputs untouched).

    Example:
        >>> lora_delta(torch.ones(1, 2), torch.full((2, 1), 2.0), alpha=1.0, rank=1, scale=0.5).tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise InputError(f"{name}: A {list(lora_A.shape)} and B {list(lora_B.shape)} do not form a LoRA; "
                         "expected A [rank, in] and B [out, rank] (conv LoRAs are not supported)")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise InputError(f"{name}: rank={rank!r} must be a positive int (normally A.shape[0] = {lora_A.shape[0]})")
    if not math.isfinite(float(alpha)) or not math.isfinite(float(scale)):
        raise InputError(f"{name}: alpha={alpha!r} and scale={scale!r} must be finite numbers")
    with torch.no_grad():
        a = lora_A.detach().to(device=device, dtype=dtype)
        b = lora_B.detach().to(device=device, dtype=dtype)
        return (b @ a) * (float(scale) * float(alpha) / rank)


def check_lora_fits(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Raise an :class:`~cq.errors.InputError` naming ``name`` unless ``B @ A`` has ``w``'s shape."""
    if w.ndim != 2 or a.ndim != 2 or b.ndim != 2 or b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1]:
        raise InputError(f"{name}: a LoRA with A {list(a.shape)}, B {list(b.shape)} does not fit the weight "
                         f"{list(w.shape)}; expected A [rank, {w.shape[-1]}] and B [{w.shape[0]}, rank]")


def merge_lora_into_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float,
                           rank: int, scale: float = 1.0) -> torch.Tensor:
    """``W + scale · (alpha/rank) · B @ A`` as a new tensor in ``W``'s dtype and device.

    Computed in float32 (float64 for a float64 ``W``) and rounded to ``W``'s dtype once; ``W``,
    ``A`` and ``B`` are never modified.

    Example:
        >>> w = torch.zeros(2, 3, dtype=torch.bfloat16)
        >>> m = merge_lora_into_weight(w, torch.ones(1, 3), torch.ones(2, 1), alpha=4.0, rank=1, scale=0.5)
        >>> m.dtype, m[0].tolist(), w.abs().sum().item()
        (torch.bfloat16, [2.0, 2.0, 2.0], 0.0)
    """
    check_lora_fits(weight, lora_A, lora_B, "merge_lora_into_weight")
    cd = _compute_dtype(weight)
    delta = lora_delta(lora_A, lora_B, alpha, rank, scale, dtype=cd, device=weight.device)
    with torch.no_grad():
        return (weight.detach().to(cd) + delta).to(weight.dtype)


def merge_multiple_loras(weight: torch.Tensor, lora_configs: Sequence[Mapping[str, Any]],
                         dampen: bool = True) -> torch.Tensor:
    """Merge several LoRAs into ``W``: the i-th (from 0) contributes ``config["scale"] · 0.9**i``.

    Each config holds ``lora_A``, ``lora_B``, ``alpha``, ``rank`` and optionally ``scale``
    (default 1). The dampening is applied once (``dampen=False`` turns it off). The deltas are
    summed in float32 (float64 for a float64 ``W``) and added to ``W`` once, so the result does
    not depend on intermediate roundings to ``W``'s dtype.

    Example:
        >>> cfg = {"lora_A": torch.ones(1, 2), "lora_B": torch.ones(2, 1), "alpha": 1.0, "rank": 1}
        >>> merge_multiple_loras(torch.zeros(2, 2), [cfg, cfg])[0].tolist()
        [1.899999976158142, 1.899999976158142]
    """
    cd = _compute_dtype(weight)
    total = torch.zeros(weight.shape, dtype=cd, device=weight.device)
    for i, c in enumerate(lora_configs):
        name = f"LoRA #{i}" + (f" ({c['source']})" if c.get("source") else "")
        check_lora_fits(weight, c["lora_A"], c["lora_B"], name)
        total += lora_delta(c["lora_A"], c["lora_B"], c["alpha"], c["rank"],
                            float(c.get("scale", 1.0)) * dampening(i, dampen), dtype=cd, device=weight.device,
                            name=name)
    with torch.no_grad():
        return (weight.detach().to(cd) + total).to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Matching LoRA names to model layers


class _KeysView:
    """A model view with keys and, where given, shapes (enough for the key map)."""

    def __init__(self, keys: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None):
        self._keys = list(dict.fromkeys(keys))
        self._shapes = dict(shapes or {})

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._shapes[key])


@attrs.frozen
class LoraKeyMap:
    """Which model layer each LoRA entry targets (by ComfyUI's key map).

    Calling it with a model key or stem returns the LoRA stems that target that layer.
    ``targets`` maps LoRA stem → model stem (the base key without ``.weight``); ``slices`` maps the
    stems that patch only rows of a fused weight to ``(dim, start, length)``; ``unmatched`` lists
    LoRA stems ComfyUI would not load. ``ambiguous`` is kept for the reference's API and is always
    empty: ComfyUI's map gives each LoRA name one target.
    """

    targets: Mapping[str, str]
    unmatched: tuple[str, ...]
    ambiguous: Mapping[str, tuple[str, ...]]
    _by_layer: Mapping[str, tuple[str, ...]] = attrs.field(repr=False)
    slices: Mapping[str, tuple[int, int, int]] = attrs.field(factory=dict)

    def __call__(self, model_key: str) -> tuple[str, ...]:
        stem = model_key[: -len(".weight")] if model_key.endswith(".weight") else model_key
        return self._by_layer.get(stem, ())

    @property
    def complete(self) -> bool:
        """Whether every LoRA entry found its model layer."""
        return not self.unmatched and not self.ambiguous

    def summary(self) -> str:
        """One line for logs: counts, and the first unmatched names."""
        parts = [f"{len(self.targets)} LoRA layer(s) matched"]
        if self.unmatched:
            names = self.unmatched
            parts.append(f"{len(names)} unmatched ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        return "; ".join(parts)


def lora_key_map(base_keys: Iterable[str] | Any, lora_bases: Iterable[str]) -> LoraKeyMap:
    """Match LoRA stems to model layers with ComfyUI's forward key map, reporting what does not match.

    ``base_keys``: the model's tensor keys, or a :class:`~cq.model.ModelView` (its shapes locate the
    fused-weight slices of Flux/SD3 diffusers names; plain keys map whole tensors only).
    ``lora_bases``: LoRA stems (e.g. the keys of :func:`load_lora_for_merging`).

    Example:
        >>> m = lora_key_map(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"],
        ...                  ["lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.nope"])
        >>> m("model.diffusion_model.double_blocks.0.img_attn.qkv.weight"), m.unmatched
        (('lora_unet_double_blocks_0_img_attn_qkv',), ('diffusion_model.nope',))
    """
    view = base_keys if hasattr(base_keys, "keys") and hasattr(base_keys, "shape") else _KeysView(base_keys)
    km = comfy_key_map(view)
    targets: dict[str, str] = {}
    slices: dict[str, tuple[int, int, int]] = {}
    unmatched: list[str] = []
    by_layer: dict[str, list[str]] = {}
    for lora in dict.fromkeys(lora_bases):
        t = km.get(lora)
        if t is None:
            unmatched.append(lora)
            continue
        stem = t.key[: -len(".weight")] if t.key.endswith(".weight") else t.key
        targets[lora] = stem
        if t.offset is not None:
            slices[lora] = t.offset
        by_layer.setdefault(stem, []).append(lora)
    return LoraKeyMap(
        targets=types.MappingProxyType(targets),
        unmatched=tuple(unmatched),
        ambiguous=types.MappingProxyType({}),
        by_layer=types.MappingProxyType({k: tuple(v) for k, v in by_layer.items()}),
        slices=types.MappingProxyType(slices),
    )
