"""Pure-torch reference kernels: the CPU path and the oracle every other backend is tested against.

Load-bearing details (easy to "simplify" wrongly):
- rounding is ``torch.round`` (half to even), done in float32 after the division, never on bf16;
- weight codes are clamped to the symmetric range [-127, 127]; activation codes to [-128, 127]
  exactly as comfy-kitchen's ``quantize_int8_rowwise`` does at ComfyUI runtime;
- the int8 product is accumulated in int32 (``torch._int_mm``), never with ``int8 @ int8``, which
  wraps around in int8.
"""

from __future__ import annotations

import torch

__all__ = ["quantize_int8_ref", "int8_linear_ref", "quantize_activations_ref"]

QMAX = 127


def quantize_int8_ref(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(round(w / scale), -127, 127)`` as int8; ``scale`` broadcasts against ``w``."""
    q = torch.round(w.to(torch.float32) / scale.to(torch.float32))
    return q.clamp_(-QMAX, QMAX).to(torch.int8)


def quantize_activations_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8 quantization of ``x`` [T, K], as comfy-kitchen does at runtime."""
    x = x.to(torch.float32)
    s = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-30)
    q = torch.round(x / s).clamp_(-128, 127).to(torch.int8)
    return q, s


def _int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    # torch._int_mm is exact int32 accumulation; fall back to an exact float64 product where the
    # build lacks it (float64 represents every int32 partial sum of int8 products exactly for K < 2**37).
    try:
        return torch._int_mm(a.contiguous(), b_t.contiguous())
    except (RuntimeError, AttributeError):
        return (a.to(torch.float64) @ b_t.to(torch.float64)).to(torch.int64)


def int8_linear_ref(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """ComfyUI's W8A8 forward: ``y = (q_x · s_x)(q_w · s_w)ᵀ + b`` with per-token ``s_x``.

    ``x`` is ``[..., K]``; ``codes`` int8 ``[N, K]``; ``scale`` is ``()`` or ``[N, 1]``.
    Returns float32 ``[..., N]``.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    qx, sx = quantize_activations_ref(x2)
    acc = _int_mm(qx, codes.t()).to(torch.float32)
    w_scale = scale.to(torch.float32).reshape(1, -1) if scale.numel() > 1 else scale.to(torch.float32)
    y = acc * sx * w_scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*lead, codes.shape[0])
