"""Quality metrics: weight MSE/SQNR, output error for a Hessian or inputs, and ComfyUI's W8A8 error.

Everything is computed in float64 so the metrics themselves add no measurable error.
"""

from __future__ import annotations

import math

import attrs
import torch

from ..kernels import Backend, int8_linear
from ..state import LayerState, PerRow, PerTensor, record
from .rounding import reconstruct, working_dequantized

__all__ = ["weight_metrics", "mse", "sqnr_db", "max_error", "rel_output_error", "w8a8_output_error", "MetricsConfig", "measure",
           "db"]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def mse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Mean squared error ``mean((w - w_hat)²)``."""
    return float(((_f64(w) - _f64(w_hat)) ** 2).mean()) if w.numel() else 0.0


def max_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((_f64(w) - _f64(w_hat)).abs().max()) if w.numel() else 0.0


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σw² / Σ(w-ŵ)²)`` in dB (``inf`` when exact).

    Example:
        >>> round(sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.05])), 2)
        40.0
    """
    signal = float((_f64(w) ** 2).sum())
    noise = float(((_f64(w) - _f64(w_hat)) ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def weight_metrics(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    """``mse``, ``sqnr_db`` and ``max_error`` from one float64 pass (what :func:`measure` records)."""
    if not w.numel():
        return {"mse": 0.0, "sqnr_db": math.inf, "max_error": 0.0}
    w64 = _f64(w)
    e = w64 - _f64(w_hat)
    noise = float(torch.dot(e.reshape(-1), e.reshape(-1)))
    signal = float(torch.dot(w64.reshape(-1), w64.reshape(-1)))
    if noise == 0.0:
        sq = math.inf
    elif signal == 0.0:
        sq = -math.inf
    else:
        sq = 10.0 * math.log10(signal / noise)
    return {"mse": noise / w.numel(), "sqnr_db": sq, "max_error": float(e.abs().max())}


def db(rel: float) -> float:
    """An amplitude ratio in dB (``-20·log10(rel)``): 0.01 → 40 dB."""
    return math.inf if rel == 0 else -20.0 * math.log10(rel)


def rel_output_error(w: torch.Tensor, w_hat: torch.Tensor, *, hessian: torch.Tensor | None = None,
                     x: torch.Tensor | None = None) -> float:
    """Relative output error ``‖(W−Ŵ)Xᵀ‖_F / ‖WXᵀ‖_F``.

    With a Hessian ``H ∝ XᵀX`` it is computed exactly as ``√(tr(EHEᵀ) / tr(WHWᵀ))``; with inputs
    ``x`` [T, K] directly. Exactly one of the two must be given.
    """
    if (hessian is None) == (x is None):
        raise ValueError("rel_output_error needs exactly one of hessian= or x=")
    e = _f64(w) - _f64(w_hat)
    if hessian is not None:
        h = _f64(hessian)
        num = float(((e @ h) * e).sum())
        den = float(((_f64(w) @ h) * _f64(w)).sum())
    else:
        xx = _f64(x).reshape(-1, x.shape[-1])
        num = float(((xx @ e.t()) ** 2).sum())
        den = float(((xx @ _f64(w).t()) ** 2).sum())
    if den <= 0.0:
        return 0.0 if num <= 0.0 else math.inf
    return math.sqrt(max(num, 0.0) / den)


def w8a8_output_error(state: LayerState, x: torch.Tensor, *, backend: Backend | str = Backend.AUTO) -> float:
    """Relative error of ComfyUI's int8 forward against the float layer on inputs ``x`` [T, K].

    The runtime rotates ``x`` (convrot), quantizes it per token, multiplies by the int8 codes and
    rescales; the reference is ``x · originalᵀ`` in float64. Bias is left out of both.
    """
    if state.codes is None or not isinstance(state.granularity, (PerTensor, PerRow)):
        raise ValueError(f"{state.name}: W8A8 error needs int8 codes with tensor or row scales")
    if "incoherence" in state.meta:
        raise ValueError(f"{state.name}: a two-sided QuIP layer has no ComfyUI W8A8 forward (its output side is "
                         "rotated too); measure it with rel_output_error on reconstruct(state)")
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    xr = state.rotation.rotate(x2) if state.rotation is not None else x2
    y = int8_linear(xr, state.codes, state.scale, None, backend=backend)
    ref = _f64(x2) @ _f64(state.original if state.original is not None else state.weight).t()
    den = float(torch.linalg.vector_norm(ref))
    num = float(torch.linalg.vector_norm(_f64(y) - ref))
    return 0.0 if den == 0.0 and num == 0.0 else (num / den if den else math.inf)


@attrs.frozen(eq=False)
class MetricsConfig:
    """What :func:`measure` computes.

    ``x``: input rows [T, K] for output and W8A8 errors (none: only the Hessian-based output error,
    when the state has a Hessian, and weight-space metrics).
    """

    x: torch.Tensor | None = attrs.field(default=None, repr=lambda t: "None" if t is None else f"Tensor{tuple(t.shape)}")
    backend: Backend = attrs.field(default=Backend.AUTO, converter=Backend)


def measure(state: LayerState, *, cfg: MetricsConfig = MetricsConfig()) -> LayerState:
    """Record weight-space and output-space quality metrics in ``state.meta["metrics"]``.

    Example:
        >>> from cq.transforms import absmax_scale, round_to_nearest
        >>> s = measure(round_to_nearest(absmax_scale(LayerState.from_weight("fc", torch.randn(8, 16)))))
        >>> sorted(s.meta["metrics"])
        ['max_error', 'mse', 'sqnr_db']
    """
    original = state.original if state.original is not None else state.weight
    w_hat = reconstruct(state)
    m = weight_metrics(original, w_hat)
    if state.hessian is not None and state.codes is not None:
        m["rel_out_h"] = rel_output_error(state.weight, working_dequantized(state), hessian=state.hessian)
    if cfg.x is not None:
        m["rel_out_x"] = rel_output_error(original, w_hat, x=cfg.x)
        if (state.codes is not None and isinstance(state.granularity, (PerTensor, PerRow))
                and "incoherence" not in state.meta):
            m["w8a8"] = w8a8_output_error(state, cfg.x, backend=cfg.backend)
    metrics = dict(state.meta.get("metrics", {}))
    metrics.update(m)
    return record(state, "measure", cfg, meta={"metrics": metrics})
