"""Merge LoRA deltas into a layer before it is quantized (the merged weight becomes the target).

Two stages share one patch model (:mod:`cq.lora.patches`):

* :func:`merge_lora_patches` applies ComfyUI-style patches (LoRA, LoHa, LoKr, DoRA, diff, set; whole
  tensors or slices of fused ones) to any tensor, weight or bias; the conversion's LoRA merge
  (:func:`cq.lora_merge.merge_loras`) produces these stages;
* :func:`merge_lora` merges explicit ``(A, B, alpha, rank, scale)`` factors into a 2-D weight (the
  reference tool's arithmetic, for Python users).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import attrs
import torch

from ..errors import ConfigError, CqError
from ..lora import check_lora_fits, dampening, lora_delta
from ..lora.patches import LoraPatch, apply_patch
from ..state import LayerState, record

__all__ = ["LoraFactors", "MergeLoraConfig", "merge_lora", "PatchEntry", "LoraPatchesConfig", "merge_lora_patches"]


def _tensor_repr(t: torch.Tensor) -> str:
    return f"Tensor{list(t.shape)}"


@attrs.frozen(eq=False)
class LoraFactors:
    """One LoRA for one layer: ``ΔW = scale · (alpha / rank) · lora_B @ lora_A``.

    ``lora_A`` is [rank, K] and ``lora_B`` [N, rank]; ``source`` names the file (for notes).
    """

    lora_A: torch.Tensor = attrs.field(repr=_tensor_repr)
    lora_B: torch.Tensor = attrs.field(repr=_tensor_repr)
    alpha: float = attrs.field(converter=float)
    rank: int = attrs.field()
    scale: float = attrs.field(default=1.0, converter=float)
    source: str | None = None

    @rank.validator
    def _check(self, attribute, value):
        a, b = self.lora_A, self.lora_B
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.ndim != 2 or b.ndim != 2 \
                or b.shape[1] != a.shape[0]:
            raise ConfigError(f"LoRA {self.source or ''}: lora_A {getattr(a, 'shape', a)!s} and lora_B "
                              f"{getattr(b, 'shape', b)!s} must be 2-D tensors [rank, K] and [N, rank]")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"LoRA rank={value!r} must be a positive int (normally lora_A.shape[0])")

    @alpha.validator
    def _finite(self, attribute, value):
        if not math.isfinite(value):
            raise ConfigError(f"LoRA alpha={value!r} must be finite")

    @classmethod
    def coerce(cls, item: Any) -> "LoraFactors":
        """From a ``LoraFactors``, an ``(A, B, alpha, rank[, scale])`` tuple or a loader dict."""
        if isinstance(item, LoraFactors):
            return item
        if isinstance(item, Mapping):
            return cls(item["lora_A"], item["lora_B"], item["alpha"], item["rank"], item.get("scale", 1.0),
                       item.get("source"))
        if isinstance(item, (tuple, list)) and len(item) in (4, 5):
            return cls(*item)
        raise ConfigError(f"a LoRA must be LoraFactors, (A, B, alpha, rank, scale) or a dict with lora_A, "
                          f"lora_B, alpha, rank; got {type(item).__name__}")


def _loras(value: Any) -> tuple[LoraFactors, ...]:
    if isinstance(value, (LoraFactors, Mapping)):
        value = (value,)
    return tuple(LoraFactors.coerce(v) for v in value)


@attrs.frozen(eq=False)
class MergeLoraConfig:
    """The LoRAs to merge into one layer, in order, and whether to dampen them.

    With ``dampen`` (the reference's default), the i-th LoRA (from 0) is scaled by an extra
    ``0.9**i`` (:func:`cq.lora.dampening`), once.
    """

    loras: tuple[LoraFactors, ...] = attrs.field(default=(), converter=_loras)
    dampen: bool = True


def merge_lora(state: LayerState, *, cfg: MergeLoraConfig = MergeLoraConfig()) -> LayerState:
    """Add the LoRA deltas to ``state.original`` and ``state.weight``; the merged weight is the new target.

    The deltas are summed in float32 (float64 for float64 weights) and the merged tensors stay in
    that precision, so quantization sees the exact merged weight (a caller writing the layer
    unquantized casts it back). For a rotated state the delta is rotated into the working basis.
    Must run before quantization: a state with codes is refused.

    Example:
        >>> s = LayerState.from_weight("fc", torch.zeros(2, 3, dtype=torch.bfloat16))
        >>> s = merge_lora(s, cfg=MergeLoraConfig([(torch.ones(1, 3), torch.ones(2, 1), 2.0, 1, 0.5)]))
        >>> s.weight.dtype, s.weight[0].tolist(), s.notes
        (torch.float32, [1.0, 1.0, 1.0], ('merged 1 LoRA (#0: scale 0.5, alpha/rank 2)',))
    """
    if not cfg.loras:
        return state
    if state.codes is not None:
        raise CqError(f"{state.name}: merge_lora must run before quantization (the state already has codes); "
                      "put the merge_lora stage first in the pipeline")
    original = state.original if state.original is not None else state.weight
    cd = torch.float64 if original.dtype == torch.float64 else torch.float32
    delta = torch.zeros(original.shape, dtype=cd, device=original.device)
    used = []
    for i, lora in enumerate(cfg.loras):
        name = f"{state.name}: LoRA #{i}" + (f" ({lora.source})" if lora.source else "")
        check_lora_fits(original, lora.lora_A, lora.lora_B, name)
        factor = lora.scale * dampening(i, cfg.dampen)
        delta += lora_delta(lora.lora_A, lora.lora_B, lora.alpha, lora.rank, factor, dtype=cd,
                            device=original.device, name=name)
        used.append(f"{lora.source or f'#{i}'}: scale {factor:g}, alpha/rank {lora.alpha / lora.rank:g}")
    with torch.no_grad():
        new_original = original.detach().to(cd) + delta
        if state.basis is not None:
            new_weight = state.weight.detach().to(cd) + state.basis.to_working(delta).to(cd)
        elif state.weight is original:
            new_weight = new_original
        else:
            new_weight = state.weight.detach().to(cd) + delta
    note = f"merged {len(used)} LoRA{'s' if len(used) > 1 else ''} ({'; '.join(used)})"
    return record(state, "merge_lora", cfg, note=note, weight=new_weight, original=new_original)


# ---------------------------------------------------------------------------------------------
# ComfyUI-style patches


def _offset(value):
    if value is None:
        return None
    if not (isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, int) for v in value)
            and value[0] >= 0 and value[1] >= 0 and value[2] > 0):
        raise ConfigError(f"a patch offset must be (dim, start, length) with dim, start >= 0 and length > 0; "
                          f"got {value!r}")
    return tuple(value)


@attrs.frozen(eq=False)
class PatchEntry:
    """One patch for one tensor: the patch, its strength, where it applies, and which file it came from.

    ``offset = (dim, start, length)`` restricts the patch to ``tensor.narrow(dim, start, length)``
    (a slice of a fused weight); ``function`` names a :data:`cq.lora.keymap.FUNCTIONS` entry applied
    to the delta (e.g. ``"swap_scale_shift"``).
    """

    patch: LoraPatch
    strength: float = attrs.field(default=1.0, converter=float)
    offset: tuple[int, int, int] | None = attrs.field(default=None, converter=_offset)
    function: str | None = None
    source: str = ""

    @strength.validator
    def _finite(self, attribute, value):
        if not math.isfinite(value):
            raise ConfigError(f"patch strength={value!r} must be finite")

    def describe(self) -> str:
        where = ""
        if self.offset is not None:
            d, a, n = self.offset
            where = f" rows {a}:{a + n}" if d == 0 else f" dim {d} {a}:{a + n}"
        return f"{self.source or 'LoRA'}{where}: {self.patch.kind} x{self.strength:g}"


@attrs.frozen(eq=False)
class LoraPatchesConfig:
    """The patches of one tensor, applied in order (ComfyUI applies a model's patches in load order)."""

    patches: tuple[PatchEntry, ...] = attrs.field(default=(), converter=tuple)

    @patches.validator
    def _entries(self, attribute, value):
        for p in value:
            if not isinstance(p, PatchEntry):
                raise ConfigError(f"LoraPatchesConfig.patches must hold PatchEntry values, got {type(p).__name__}")


def merge_lora_patches(state: LayerState, *, cfg: LoraPatchesConfig = LoraPatchesConfig()) -> LayerState:
    """Apply ComfyUI-style LoRA patches to the layer in its original basis, in float32.

    Works on any tensor shape (a bias edit sees a 1-D weight). The merged tensor becomes both
    ``original`` and (mapped into the working basis, if any) ``weight``; it stays float32 so that
    quantization sees the exact merged values. Must run before quantization.

    Example:
        >>> from cq.lora import LoraPatch
        >>> p = LoraPatch("diff", {"diff": torch.ones(1)})
        >>> s = merge_lora_patches(LayerState.from_weight("fc.bias", torch.zeros(2, dtype=torch.bfloat16)),
        ...                        cfg=LoraPatchesConfig((PatchEntry(p, 0.5, (0, 1, 1), source="a"),)))
        >>> s.weight.dtype, s.weight.tolist(), s.notes
        (torch.float32, [0.0, 0.5], ('merged 1 LoRA patch (a rows 1:2: diff x0.5)',))
    """
    if not cfg.patches:
        return state
    if state.codes is not None:
        raise CqError(f"{state.name}: merge_lora_patches must run before quantization (the state already has "
                      "codes); put the LoRA merge first")
    original = state.original if state.original is not None else state.weight
    merged = original
    for entry in cfg.patches:
        if entry.offset is not None:
            d, a, n = entry.offset
            if d >= merged.ndim or a + n > merged.shape[d]:
                raise CqError(f"{state.name}: LoRA key {entry.patch.name!r} targets {entry.offset} of a tensor "
                              f"{list(merged.shape)}; the slice lies outside it")
        merged = apply_patch(merged, entry.patch, entry.strength, entry.offset, entry.function)
    basis = getattr(state, "basis", None)
    weight = merged if basis is None else basis.to_working(merged)
    n = len(cfg.patches)
    note = f"merged {n} LoRA patch{'es' if n > 1 else ''} ({'; '.join(e.describe() for e in cfg.patches)})"
    return record(state, "merge_lora_patches", cfg, note=note, weight=weight, original=merged)
