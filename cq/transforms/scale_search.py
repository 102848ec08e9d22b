"""Per-row scale (clipping) search under the layer's own loss, jointly with the rounding.

Absmax scales never clip, but on heavy-tailed rows a slightly smaller step ``α·absmax/127`` lowers
the rounding error of every other weight by more than it costs the clipped few. The search runs the
rounding (round-to-nearest, GPTQ or LDLQ) once per candidate ``α`` for the whole layer and keeps,
*per row*, the candidate with the smallest loss ``e_r H e_rᵀ`` (``e_r = w_r − ŵ_r``; ``H = I`` without
data). Rows are independent in all three rounders given one Hessian, so mixing rows from different
runs is exact. ``α = 1`` with round-to-nearest is always a candidate: the result never has a larger
loss than absmax scales with RTN — nor than absmax with the chosen rounder — on the same objective.
"""

from __future__ import annotations

import math

import attrs
import torch

from ..errors import ConfigError
from ..state import LayerState, PerRow, PerTensor, record
from .gptq import GPTQConfig, gptq_update
from .ldlq import LDLQConfig, ldlq
from .rounding import _need_scale, int8_format
from ..kernels import quantize_int8

__all__ = ["ScaleSearchConfig", "scale_search", "row_losses", "DEFAULT_GRID"]

#: Clipping factors tried by default (1.0 = absmax). At INT8 clipping rarely pays under weight MSE
#: (clipping the row maximum by 1 % costs ~1.6 steps² against K·0.0017 steps² saved), so the grid is
#: dense near 1; under a Hessian a maximum in a little-used input column can be clipped much further.
DEFAULT_GRID = (1.0, 0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8)


def _grid(instance, attribute, value):
    ok = (isinstance(value, tuple) and value and 1.0 in value and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and 0 < a <= 2 for a in value))
    if not ok:
        raise ConfigError(f"grid={value!r} must be a non-empty tuple of factors in (0, 2] that contains 1.0 "
                          "(absmax), e.g. (1.0, 0.95, 0.9)")


def _rounder(instance, attribute, value):
    if value is not None and not isinstance(value, (LDLQConfig, GPTQConfig)):
        raise ConfigError(f"rounder must be None (round to nearest), an LDLQConfig or a GPTQConfig, "
                          f"got {type(value).__name__}")


def _objective(instance, attribute, value):
    if value not in ("auto", "hessian", "mse"):
        raise ConfigError(f"objective={value!r} must be 'auto' (the Hessian when the layer has one, else "
                          "weight MSE), 'hessian' or 'mse'")


@attrs.frozen
class ScaleSearchConfig:
    """How :func:`scale_search` searches.

    ``grid``: factors ``α`` applied to the state's current (absmax) scale; must contain 1.0.
    ``rounder``: ``None`` = round to nearest, or an :class:`~cq.transforms.ldlq.LDLQConfig` /
    :class:`~cq.transforms.gptq.GPTQConfig` (one rounding per factor). ``objective``: ``"auto"``
    uses ``state.hessian`` when present, else weight MSE. ``only_without_hessian``: the data-free
    step of a recipe (a state with a Hessian passes unchanged).

    Example:
        >>> ScaleSearchConfig().grid[0], ScaleSearchConfig(rounder=LDLQConfig()).objective
        (1.0, 'auto')
    """

    grid: tuple[float, ...] = attrs.field(default=DEFAULT_GRID, converter=tuple, validator=_grid)
    rounder: LDLQConfig | GPTQConfig | None = attrs.field(default=None, validator=_rounder)
    objective: str = attrs.field(default="auto", validator=_objective)
    #: Pass a state that has a Hessian through unchanged: the data-free step of a recipe whose
    #: data-aware rounding (LDLQ/GPTQ) comes next (measured: searching under H does not help there).
    only_without_hessian: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


def row_losses(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """``[N]`` float64 per-row losses ``e_r H e_rᵀ`` (``‖e_r‖²`` when ``hessian`` is None).

    The product runs in float32 (relative error ~1e-6, far below the differences the search
    compares), the reductions in float64.

    Example:
        >>> row_losses(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]]), torch.eye(2) * 3).tolist()
        [3.0]
    """
    e = weight.detach().to(torch.float32) - w_hat.detach().to(torch.float32)
    if hessian is None:
        # A blocked float32 reduction (relative error ~1e-7): a float64 copy of the error made the
        # data-free search 4x slower on 3072² layers.
        return torch.linalg.vector_norm(e, dim=1).to(torch.float64) ** 2
    return ((e @ hessian.detach().to(torch.float32)) * e).to(torch.float64).sum(1)


#: Rows per block of the data-free search: one block's candidates stay in cache (whole-weight
#: passes per candidate made it ~70x slower than RTN on a 3072² layer; blocked: see the benchmark).
_ROWS = 128


def _rtn_mse_search(weight: torch.Tensor, base_rows: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Round to nearest with per-row ``α`` from ``grid`` minimising ``‖w_r − ŵ_r‖²``, a row block at a time.

    Same arithmetic as :func:`~cq.kernels.quantize_int8` (float32 division, round half to even,
    clamp ±127) and :func:`row_losses`. Returns ``(codes int8 [N, K], α [N, 1], loss / loss at α = 1)``.
    """
    n, k = weight.shape
    codes = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    alphas = torch.ones((n, 1), dtype=torch.float32, device=weight.device)
    total = ref_total = 0.0
    order = (1.0,) + tuple(a for a in grid if a != 1.0)
    for i in range(0, n, _ROWS):
        wb = weight[i:i + _ROWS].detach().to(torch.float32)
        sb = base_rows[i:i + _ROWS]
        best = None
        for a in order:
            s = (sb * a).to(torch.float32)
            q = torch.round(wb / s).clamp_(-127, 127)
            loss = torch.linalg.vector_norm(wb - q * s, dim=1).to(torch.float64) ** 2
            if best is None:
                best, ref = loss, loss
                codes[i:i + _ROWS] = q.to(torch.int8)
                continue
            better = loss < best
            if bool(better.any()):
                best = torch.where(better, loss, best)
                rows = better.nonzero().flatten()
                codes[i + rows] = q[rows].to(torch.int8)
                alphas[i + rows] = a
        total += float(best.sum())
        ref_total += float(ref.sum())
    return codes, alphas, (total / ref_total if ref_total > 0 else 1.0)


def _round(state: LayerState, rounder) -> LayerState:
    if rounder is None:
        codes = quantize_int8(state.weight, state.scale.to(torch.float32))
        return attrs.evolve(state, codes=codes, format=int8_format(state.granularity))
    quiet = attrs.evolve(rounder, metrics=False)
    return ldlq(state, cfg=quiet) if isinstance(rounder, LDLQConfig) else gptq_update(state, cfg=quiet)


def scale_search(state: LayerState, *, cfg: ScaleSearchConfig = ScaleSearchConfig()) -> LayerState:
    """Round ``state`` with per-row scales ``α_r · scale_r`` chosen from ``cfg.grid`` by the layer's loss.

    Needs a per-row or per-tensor scale (run :func:`~cq.transforms.scales.absmax_scale` first); a
    per-tensor scale gets one factor for the whole tensor. Sets ``codes`` and ``scale``; records
    ``metrics["scale_search_gain"]`` (loss / loss of absmax RTN, ≤ 1) and ``metrics["scale_alpha_mean"]``.

    Example:
        >>> from cq.transforms import absmax_scale
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.randn(16, 64, generator=g)
        >>> w[:, 0] *= 8  # each row's maximum sits in input 0, which the data barely uses
        >>> h = torch.diag(torch.cat([torch.tensor([1e-4]), torch.ones(63)]))
        >>> s = scale_search(absmax_scale(LayerState.from_weight("fc", w, hessian=h)))
        >>> s.metrics["scale_search_gain"] < 0.7, s.codes.dtype  # the grid stops at α = 0.8
        (True, torch.int8)
    """
    if cfg.only_without_hessian and state.hessian is not None:
        return state
    _need_scale(state, "scale_search")
    if not isinstance(state.granularity, (PerRow, PerTensor)):
        raise ConfigError(f"{state.name}: scale_search supports per-row and per-tensor scales, got "
                          f"{state.granularity!r}; use ScaleConfig(PerRow())")
    use_h = cfg.objective == "hessian" or (cfg.objective == "auto" and state.hessian is not None)
    if use_h and state.hessian is None:
        raise ConfigError(f"{state.name}: scale_search objective='hessian' needs a calibration Hessian; "
                          "use objective='auto' or 'mse' without data")
    h = state.hessian if use_h else None
    n = state.shape[0]
    base = state.scale.to(torch.float32)
    per_row = isinstance(state.granularity, PerRow)
    base_rows = base.reshape(-1, 1).expand(n, 1) if not per_row else base.reshape(n, 1)

    if cfg.rounder is None and h is None and per_row:
        codes, alphas, gain = _rtn_mse_search(state.weight, base_rows, cfg.grid)
        return record(state, "scale_search", cfg, codes=codes, scale=(base_rows * alphas).contiguous(),
                      format=int8_format(state.granularity),
                      metrics={"scale_search_gain": gain, "scale_alpha_mean": float(alphas.mean())})

    def losses_of(s: LayerState) -> torch.Tensor:
        w_hat = s.codes.to(torch.float32) * s.scale.to(torch.float32).reshape(-1, 1).expand(n, 1)
        return row_losses(s.weight, w_hat, h)

    ref = _round(state, None)  # absmax RTN: the guarantee's reference
    best_loss = losses_of(ref)
    ref_total = float(best_loss.sum())
    best_codes = ref.codes.clone()
    best_scale = base_rows.clone()
    candidates = [(1.0, cfg.rounder)] if cfg.rounder is not None else []
    candidates += [(a, cfg.rounder) for a in cfg.grid if a != 1.0]
    for alpha, rounder in candidates:
        scale = (base * alpha).to(torch.float32)
        out = _round(attrs.evolve(state, scale=scale, codes=None), rounder)
        loss = losses_of(out)
        if per_row:
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best_codes[better] = out.codes[better]
            best_scale[better] = base_rows[better] * alpha
        elif float(loss.sum()) < float(best_loss.sum()):
            best_loss, best_codes = loss, out.codes.clone()
            best_scale = base_rows * alpha
    total = float(best_loss.sum())
    scale = best_scale.reshape(n, 1) if per_row else best_scale[:1].reshape(base.shape)
    alphas = (best_scale / base_rows).reshape(-1)
    metrics = {"scale_search_gain": total / ref_total if ref_total > 0 else 1.0,
               "scale_alpha_mean": float(alphas.mean())}
    return record(state, "scale_search", cfg, metrics=metrics, codes=best_codes.contiguous(),
                  scale=scale.to(torch.float32).contiguous(), format=int8_format(state.granularity))
