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
from .rows import ROW_DTYPES, RowQuant, quantize_rows_ref, row_metrics

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
    "quantize_rows",
    "quantize_rows_ref",
    "RowQuant",
    "row_metrics",
]

register(KernelImpl(op="quantize_int8", name="torch", fn=quantize_int8_ref, priority=0))
register(KernelImpl(op="int8_linear", name="torch", fn=int8_linear_ref, priority=0))


def _rows_check(w: torch.Tensor, *rest) -> list[str]:
    if w.ndim != 2:
        return [f"needs a 2-D weight [N, K], got shape {tuple(w.shape)}"]
    if w.dtype not in ROW_DTYPES:
        return [f"reads {[str(d) for d in ROW_DTYPES]}, got {w.dtype}; cast the weight first"]
    return []


def _rows_check_ref(w: torch.Tensor, *rest) -> list[str]:
    if w.ndim != 2 or not w.is_floating_point():
        return [f"needs a 2-D float weight [N, K], got shape {tuple(w.shape)} dtype {w.dtype}"]
    return []


def _numba_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("numba") is None:
        return "the numba package is not installed (pip install numba)"
    return None


def _quantize_rows_numba(w: torch.Tensor) -> RowQuant:
    # Imported on first use: numba's import and kernel load cost ~1 s, paid only by runs that quantize.
    from .numba_rows import quantize_rows_numba

    return quantize_rows_numba(w)


register(KernelImpl(op="quantize_rows", name="torch", fn=quantize_rows_ref, priority=0, check=_rows_check_ref))
register(KernelImpl(op="quantize_rows", name="numba", fn=_quantize_rows_numba, devices=("cpu",), priority=10,
                    available=_numba_missing, check=_rows_check))

try:  # Triton kernels register themselves; importing them never fails the package import.
    from . import triton_kernels as _triton_kernels  # noqa: F401
except ImportError:  # pragma: no cover - exercised only where the module is absent
    pass


def quantize_int8(w: torch.Tensor, scale: torch.Tensor, *, backend: Backend | str = Backend.AUTO) -> torch.Tensor:
    """Round ``w / scale`` half-to-even into int8 codes in [-127, 127] with the chosen backend."""
    return select("quantize_int8", backend, (w, scale)).fn(w, scale)


def quantize_rows(w: torch.Tensor, *, backend: Backend | str = Backend.AUTO) -> RowQuant:
    """Per-row absmax INT8 codes, scales and error sums of ``w`` [N, K] in one sweep (:mod:`cq.kernels.rows`).

    Example:
        >>> r = quantize_rows(torch.tensor([[0.5, -1.27]], dtype=torch.bfloat16))
        >>> r.codes.tolist(), round(r.scale.item(), 4)
        ([[50, -127]], 0.01)
    """
    return select("quantize_rows", backend, (w,)).fn(w)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                *, backend: Backend | str = Backend.AUTO) -> torch.Tensor:
    """ComfyUI's dynamic per-token W8A8 linear (see :func:`int8_linear_ref`) with the chosen backend."""
    return select("int8_linear", backend, (x, codes, scale)).fn(x, codes, scale, bias)
