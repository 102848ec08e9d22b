"""``quantize_rows``: per-row absmax INT8 codes, scales and the report's error sums in one sweep.

The op fuses what the default recipe did in four passes (float32 cast, absmax scale, rounding,
weight metrics). Its contract, shared by every backend and checked by the parity tests:

- ``scale[r] = max(amax(|w[r]|) / 127, 1e-30)`` in float32 (the amax is exact in any dtype);
- ``codes[r] = clamp(round_half_even(float32(w[r]) / scale[r]), -127, 127)`` — a float32 *division*,
  bit for bit what :func:`~cq.transforms.scales.absmax_scale` + :func:`~cq.kernels.quantize_int8` give;
- per-row sums ``sq_w = Σ w²``, ``sq_err = Σ (w − ŵ)²`` and ``max_err = max |w − ŵ|`` with
  ``ŵ = float32(codes · scale)``; ``max_err`` is exact, the sums carry float32 summation error
  (≤ ~1e-6 relative, far below any quantization error they describe).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RowQuant", "quantize_rows_ref", "row_metrics", "sqnr_from_sums", "ROW_DTYPES"]

QMAX = 127
SCALE_FLOOR = 1e-30
#: Input dtypes every backend reads directly (others are cast to float32 by the caller).
ROW_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Rows per block: a [256, K] float32 block and its temporaries stay in L2 for K up to ~4096.
BLOCK_ROWS = 256


class RowQuant(NamedTuple):
    """What ``quantize_rows`` returns for a weight ``[N, K]``."""

    codes: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N, 1]
    sq_w: torch.Tensor  # float64 [N]: Σ w² per row
    sq_err: torch.Tensor  # float64 [N]: Σ (w − ŵ)² per row
    max_err: torch.Tensor  # float64 [N]: max |w − ŵ| per row


def sqnr_from_sums(signal: float, noise: float) -> float:
    """``10·log10(signal / noise)`` in dB from the two sums of squares: ``inf`` when the noise is 0,
    ``-inf`` when only the signal is (the one definition every SQNR in cq uses).

    Example:
        >>> sqnr_from_sums(25.0, 0.0025), sqnr_from_sums(1.0, 0.0)
        (40.0, inf)
    """
    import math

    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def quantize_rows_ref(w: torch.Tensor) -> RowQuant:
    """Pure-torch ``quantize_rows`` on row blocks (the oracle, and the path without numba).

    Example:
        >>> r = quantize_rows_ref(torch.tensor([[1.27, -2.54, 0.01], [0.0, 0.0, 0.0]]))
        >>> r.codes.tolist(), [round(v, 4) for v in r.scale.flatten().tolist()]
        ([[64, -127, 0], [0, 0, 0]], [0.02, 0.0])
    """
    n, k = w.shape
    codes = torch.empty((n, k), dtype=torch.int8)
    scale = torch.full((n, 1), SCALE_FLOOR, dtype=torch.float32)
    sums = torch.zeros((3, n), dtype=torch.float64)
    if not k:
        return RowQuant(codes, scale, sums[0], sums[1], sums[2])
    for i in range(0, n, BLOCK_ROWS):
        blk = w[i:i + BLOCK_ROWS]
        s = (blk.abs().amax(dim=1, keepdim=True).to(torch.float32) / QMAX).clamp_(min=SCALE_FLOOR)
        w32 = blk.to(torch.float32, copy=True)
        q = (w32 / s).round_().clamp_(-QMAX, QMAX)
        codes[i:i + BLOCK_ROWS] = q
        err = w32.sub_(q.mul_(s))  # w − ŵ, in place of the float32 copy
        scale[i:i + BLOCK_ROWS] = s
        sums[0, i:i + BLOCK_ROWS] = torch.linalg.vector_norm(blk.to(torch.float32), dim=1).double().square_()
        sums[1, i:i + BLOCK_ROWS] = torch.linalg.vector_norm(err, dim=1).double().square_()
        sums[2, i:i + BLOCK_ROWS] = err.abs_().amax(dim=1).double()
    return RowQuant(codes, scale, sums[0], sums[1], sums[2])


def row_metrics(r: RowQuant, numel: int) -> dict[str, float]:
    """``mse``, ``sqnr_db``, ``max_error`` of the whole weight from the per-row sums.

    The same keys and definitions as :func:`cq.transforms.metrics.weight_metrics`.

    Example:
        >>> row_metrics(quantize_rows_ref(torch.tensor([[3.0, 4.0]])), 2)["max_error"] < 0.02
        True
    """
    noise = float(r.sq_err.sum())
    signal = float(r.sq_w.sum())
    sq = sqnr_from_sums(signal, noise)
    worst = float(r.max_err.max()) if r.max_err.numel() else 0.0
    return {"mse": noise / numel if numel else 0.0, "sqnr_db": sq, "max_error": worst}
