"""The default per-row RTN recipe as one stage: codes, scales and weight metrics in one sweep.

``fused_rtn`` is an optimisation of ``check_finite → absmax_scale(PerRow) → round_to_nearest →
measure`` (weight-only metrics), not a behaviour change: the codes, scales, format and metric keys
are the same (see :mod:`cq.kernels.rows` for the contract and the parity tests). It reads the
weight in its stored dtype (bfloat16/float16/float32), so a runner need not cast it first.
"""

from __future__ import annotations

import attrs
import torch

from .._validators import backend as _backend_converter
from ..errors import CqError
from ..kernels import Backend, quantize_rows, row_metrics
from ..state import LayerState, PerRow, record
from .checks import check_finite, check_linear
from .rounding import int8_format

__all__ = ["FusedRTNConfig", "fused_rtn"]


@attrs.frozen
class FusedRTNConfig:
    """How :func:`fused_rtn` runs.

    ``backend``: the ``quantize_rows`` kernel (``"auto"``: numba when installed, else torch).
    ``metrics``: record ``mse``, ``sqnr_db``, ``max_error`` (what :func:`~cq.transforms.metrics.measure`
    records without inputs); they come from sums the kernel forms anyway, so they are almost free.

    Example:
        >>> FusedRTNConfig().backend.value
        'auto'
    """

    backend: Backend = attrs.field(default=Backend.AUTO, converter=_backend_converter)
    metrics: bool = True


def fused_rtn(state: LayerState, *, cfg: FusedRTNConfig = FusedRTNConfig()) -> LayerState:
    """Per-row absmax INT8 codes and scales of ``state.weight`` plus its weight metrics, in one pass.

    Raises :class:`~cq.errors.NonFiniteWeightError` (as ``check_finite``) when a row holds NaN/Inf.
    Weight metrics are recorded only when the working weight is the original one (no basis): in a
    rotated basis the maximum error differs, and ``measure`` computes it in the original basis.

    Example:
        >>> s = fused_rtn(LayerState.from_weight("fc", torch.tensor([[0.5, -1.27]], dtype=torch.bfloat16)))
        >>> s.codes.tolist(), s.format, sorted(s.metrics)
        ([[50, -127]], 'int8_tensorwise', ['max_error', 'mse', 'sqnr_db'])
    """
    check_linear(state)
    r = quantize_rows(state.weight, backend=cfg.backend)
    if not bool(torch.isfinite(r.scale).all()):  # a NaN or Inf anywhere in a row makes its absmax non-finite
        check_finite(state)  # raises with the counts and the first position
        raise CqError(f"{state.name}: non-finite scale from a finite weight")  # pragma: no cover
    same_basis = state.original is None or state.original is state.weight
    metrics = row_metrics(r, state.weight.numel()) if cfg.metrics and same_basis else None
    # The per-row sums let measure() estimate output errors of big layers on importance-sampled rows.
    meta = {"row_sums": (r.sq_w, r.sq_err)} if cfg.metrics and same_basis else None
    gran = PerRow()
    return record(state, "fused_rtn", cfg, metrics=metrics, meta=meta, codes=r.codes, scale=r.scale,
                  granularity=gran, format=int8_format(gran))
