"""Merge LoRA deltas into a layer before it is quantized (the merged weight becomes the target)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import attrs
import torch

from ..errors import ConfigError, CqError
from ..lora import check_lora_fits, dampening, lora_delta
from ..state import LayerState, record

__all__ = ["LoraFactors", "MergeLoraConfig", "merge_lora"]


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
