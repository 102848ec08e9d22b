"""Seeded synthetic layers with the statistics that make INT8 hard (for tests, benchmarks, property tests).

The recipe follows the team's reference measurements (algorithms.md §8): inputs are correlated
(random rotation with a decaying spectrum), have log-normal channel scales and 0.5 % outlier
channels ×20 (LLM.int8-style); weights are Student-t(4) with log-normal row and column scales and
0.01 % ×10 outliers, rescaled to std 0.02.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["SyntheticLayer", "outlier_layer"]

_F64 = torch.float64


class SyntheticLayer(NamedTuple):
    """``weight`` [n, k], ``inputs`` [t, k] and ``hessian`` = 2/t·XᵀX [k, k], all float32."""

    weight: torch.Tensor
    inputs: torch.Tensor
    hessian: torch.Tensor


def outlier_layer(n: int = 512, k: int = 1024, t: int = 4096, *, seed: int = 0) -> SyntheticLayer:
    """An outlier-heavy Linear layer and its inputs, deterministic for a seed (built in float64).

    Example:
        >>> w, x, h = outlier_layer(8, 16, 64, seed=1)
        >>> tuple(w.shape), tuple(x.shape), tuple(h.shape), bool(torch.allclose(h, h.T))
        ((8, 16), (64, 16), (16, 16), True)
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=_F64))
    spectrum = torch.arange(1, k + 1, dtype=_F64) ** -0.5
    x = torch.randn(t, k, generator=g, dtype=_F64) @ (q * spectrum).T
    x = x * torch.exp(0.5 * torch.randn(k, generator=g, dtype=_F64))
    x[:, torch.randperm(k, generator=g)[: max(1, round(0.005 * k))]] *= 20.0
    chi2 = (torch.randn(4, n, k, generator=g, dtype=_F64) ** 2).sum(0) / 4  # Student-t(4) = z / sqrt(chi2_4 / 4)
    w = torch.randn(n, k, generator=g, dtype=_F64) / chi2.sqrt()
    w = w * torch.exp(0.25 * torch.randn(n, 1, generator=g, dtype=_F64))
    w = w * torch.exp(0.25 * torch.randn(1, k, generator=g, dtype=_F64))
    w.view(-1)[torch.randperm(n * k, generator=g)[: max(1, round(1e-4 * n * k))]] *= 10.0
    w = w / w.std() * 0.02
    h = (2.0 / t) * (x.T @ x)
    return SyntheticLayer(w.float(), x.float(), h.float())
