"""``LearnedRoundingConverter``: the reference's class name, over cq's round-to-nearest pipeline.

Learned rounding itself is not implemented yet. The class exists so scripts written against the
reference import unchanged; ``convert`` raises ``NotImplementedError`` unless the caller asks for
``no_learned_rounding=True`` (the reference's ``--simple``), which is plain round-to-nearest.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ..config import granularity_for
from ..errors import ConfigError
from ..recipes import fp16_pipeline, rtn_pipeline
from ..state import LayerState
from ..transforms import reconstruct

__all__ = ["LearnedRoundingConverter", "ConvertResult"]


class ConvertResult(NamedTuple):
    """``(q, scale, dequantized)``: int8 (or fp16) codes, float32 scale, float32 reconstruction."""

    q: torch.Tensor
    scale: torch.Tensor
    dequantized: torch.Tensor


class LearnedRoundingConverter:
    """Reference-compatible converter class (``scaling_mode``: tensor, row/axis, block).

    Example:
        >>> c = LearnedRoundingConverter(scaling_mode="axis", no_learned_rounding=True)
        >>> q, scale, deq = c.convert(torch.tensor([[0.5, -1.27]]))
        >>> q.tolist(), tuple(scale.shape)
        ([[50, -127]], (1, 1))
    """

    def __init__(self, block_size: int = 128, num_iter: int = 500, lr: float = 8.0773e-3,
                 optimizer: str = "original", lr_schedule: str = "adaptive", top_p: float = 0.01, min_k: int = 1,
                 max_k: int = 16, scaling_mode: str = "block", target_format: str = "int8",
                 smoothquant: bool = False, smoothquant_alpha: float = 0.5, low_memory: bool = False,
                 no_learned_rounding: bool = False, **optimizer_kwargs: Any):
        if target_format not in ("int8", "fp16"):
            raise ConfigError(f"target_format={target_format!r} is not one of ['int8', 'fp16']")
        if smoothquant:
            raise NotImplementedError("smoothquant: SmoothQuant is not implemented in cq yet")
        self.block_size = block_size
        self.scaling_mode = scaling_mode
        self.target_format = target_format
        self.no_learned_rounding = no_learned_rounding
        self.optimizer = optimizer
        self.optimizer_kwargs = dict(optimizer_kwargs, num_iter=num_iter, lr=lr, lr_schedule=lr_schedule,
                                     top_p=top_p, min_k=min_k, max_k=max_k)
        self.pipeline = (fp16_pipeline() if target_format == "fp16"
                         else rtn_pipeline(granularity_for(scaling_mode, block_size)))

    def convert(self, W: torch.Tensor, activation_scales: torch.Tensor | None = None) -> ConvertResult:
        if activation_scales is not None:
            raise NotImplementedError("activation_scales: SmoothQuant is not implemented in cq yet")
        if self.target_format == "int8" and not self.no_learned_rounding:
            raise NotImplementedError(
                f"learned rounding (optimizer={self.optimizer!r}) is not implemented in cq yet; construct the "
                "converter with no_learned_rounding=True for round-to-nearest, or use GPTQInt8Converter")
        state = self.pipeline(LayerState.from_weight("weight", W.to(torch.float32)))
        if state.format == "fp16":
            return ConvertResult(state.weight, torch.tensor(1.0), state.weight.float())
        return ConvertResult(state.codes, state.scale, reconstruct(state))
