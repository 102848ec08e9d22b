"""Kernel ops behind a backend dispatch; the pure-torch reference is always registered.

Example:
    >>> import torch
    >>> from cq.kernels import quantize_int8
    >>> quantize_int8(torch.tensor([[0.5, -1.0]]), torch.tensor([[1 / 127]])).tolist()
    [[64, -127]]
"""

from __future__ import annotations

import torch

from ._registry import Backend, KernelImpl, implementations, not_supported_reasons, register, select
from .reference import int8_linear_ref, quantize_activations_ref, quantize_int8_ref

__all__ = [
    "Backend",
    "KernelImpl",
    "register",
    "select",
    "implementations",
    "not_supported_reasons",
    "quantize_int8",
    "int8_linear",
    "quantize_int8_ref",
    "int8_linear_ref",
    "quantize_activations_ref",
]

register(KernelImpl(op="quantize_int8", name="torch", fn=quantize_int8_ref, priority=0))
register(KernelImpl(op="int8_linear", name="torch", fn=int8_linear_ref, priority=0))

try:  # Triton kernels register themselves; importing them never fails the package import.
    from . import triton_kernels as _triton_kernels  # noqa: F401
except ImportError:  # pragma: no cover - exercised only where the module is absent
    pass


def quantize_int8(w: torch.Tensor, scale: torch.Tensor, *, backend: Backend | str = Backend.AUTO) -> torch.Tensor:
    """Round ``w / scale`` half-to-even into int8 codes in [-127, 127] with the chosen backend."""
    return select("quantize_int8", backend, (w, scale)).fn(w, scale)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                *, backend: Backend | str = Backend.AUTO) -> torch.Tensor:
    """ComfyUI's dynamic per-token W8A8 linear (see :func:`int8_linear_ref`) with the chosen backend."""
    return select("int8_linear", backend, (x, codes, scale)).fn(x, codes, scale, bias)
