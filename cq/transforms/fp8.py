"""FP8 (``float8_e4m3fn``) output: per-tensor scale, round-to-nearest-even with saturation, metrics.

ComfyUI's ``float8_e4m3fn`` layer (``TensorCoreFP8Layout`` in comfy-kitchen) is ``L.weight``
(F8_E4M3 ``[N, K]``), ``L.weight_scale`` (float32 0-dim) and optionally ``L.input_scale`` (float32
0-dim); the value is ``weight.float() · weight_scale``. The runtime quantizes activations too: each
forward flattens ``x`` to ``[T, K]`` in the compute dtype, picks ``s_x = input_scale`` when the layer
has one and ``amax(|x|)/448`` (dynamic, per call) when it has none, stores ``clamp(x · (1/s_x), ±448)``
as e4m3 and multiplies the two fp8 operands with float32 accumulation (``torch._scaled_mm``).
:func:`fp8_linear` reproduces that path in plain torch so the quality report can state the error
users get on Ada/Hopper GPUs, next to the weight-only error (dequantize path: LoRA, text encoders,
``full_precision_matrix_mult``).

The e4m3fn grid: 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities, max ±448, smallest
normal 2⁻⁶, subnormal spacing 2⁻⁹. Between 2^e and 2^(e+1) the spacing is 2^(e−3).
"""

from __future__ import annotations

import math

import attrs
import torch

from ..errors import ConfigError, CqError
from ..state import LayerState, PerTensor, record
from .metrics import MetricsConfig, rel_output_error, weight_metrics
from .rounding import working_dequantized
from .scales import SCALE_FLOOR

__all__ = [
    "FP8_FORMAT", "FP8_FORMATS", "E4M3_MAX", "Fp8Config",
    "e4m3_spacing", "quantize_e4m3", "fp8_scale", "fp8_input_scale", "fp8_round", "fp8_linear",
    "fp8_output_error", "Fp8MetricsConfig", "measure_fp8", "fp8_pipeline", "fp8_measure_stage", "is_fp8_state",
]

#: The FP8 format cq writes (ComfyUI ``QUANT_ALGOS`` name and safetensors F8_E4M3 storage).
FP8_FORMAT = "float8_e4m3fn"
#: FP8 formats cq can *read* (inputs); only ``float8_e4m3fn`` is written.
FP8_FORMATS = frozenset({"float8_e4m3fn", "float8_e5m2"})
#: Largest finite e4m3fn magnitude (comfy-kitchen's ``F8_E4M3_MAX``).
E4M3_MAX = 448.0
_E4M3_MIN_NORMAL_EXP = -6
_E4M3_MANTISSA_BITS = 3


def _fp8_format(instance, attribute, value):
    if value != FP8_FORMAT:
        raise ConfigError(f"Fp8Config.format={value!r}: cq writes only {FP8_FORMAT!r} (ComfyUI's FP8 layout); "
                          "float8_e5m2 is accepted as an input only")


def _bool(instance, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{type(instance).__name__}.{attribute.name}={value!r} must be True or False")


@attrs.frozen
class Fp8Config:
    """How :func:`fp8_pipeline` builds a ``float8_e4m3fn`` layer.

    ``input_scale``: write a static ``L.input_scale = max(calibration absmax)/448`` so the runtime
    quantizes activations with a fixed scale instead of a per-call ``amax``; needs
    ``state.meta["input_absmax"]`` (the calibration's per-channel ``max |x|``, any shape).
    """

    format: str = attrs.field(default=FP8_FORMAT, validator=_fp8_format)
    input_scale: bool = attrs.field(default=False, validator=_bool)


def e4m3_spacing(a: torch.Tensor) -> torch.Tensor:
    """Distance between adjacent e4m3fn values at magnitude ``|a|`` (float64; ``2⁻⁹`` below 2⁻⁶).

    Example:
        >>> e4m3_spacing(torch.tensor([0.001, 1.0, 1.9, 300.0])).tolist()
        [0.001953125, 0.125, 0.125, 32.0]
    """
    a = a.detach().to(torch.float64).abs()
    exp = torch.floor(torch.log2(a.clamp(min=2.0 ** _E4M3_MIN_NORMAL_EXP)))
    return torch.pow(2.0, exp - _E4M3_MANTISSA_BITS)


#: Elements per block in :func:`quantize_e4m3`: a float32 block stays in cache (a whole-weight float32
#: copy would double the memory traffic and the peak memory of a conversion).
_BLOCK = 1 << 16


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``float8_e4m3fn`` codes of ``x / scale``: round to nearest, ties to even, saturating at ±448.

    The division is done in float32 (exactly rounded, so a value on the grid stays on it); the
    clamp comes first because e4m3fn has no infinity (torch's cast of an out-of-range value is
    not a saturation on every version). Works a cache-sized block at a time.

    Example:
        >>> quantize_e4m3(torch.tensor([1.0625, 1.1875, 1000.0, -3e-4]), 1.0).float().tolist()
        [1.0, 1.25, 448.0, -0.0]
    """
    s = (scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))).to(torch.float32)
    src = x.detach().contiguous().reshape(-1)
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    dst = out.view(-1)
    for i in range(0, src.numel(), _BLOCK):
        y = src[i:i + _BLOCK].to(torch.float32, copy=True)
        dst[i:i + _BLOCK] = y.div_(s).clamp_(-E4M3_MAX, E4M3_MAX)
    return out


def is_fp8_state(state: LayerState) -> bool:
    """Whether ``state`` holds fp8 codes (its format is an FP8 label)."""
    return state.format in FP8_FORMATS


def fp8_scale(state: LayerState, *, cfg: Fp8Config = Fp8Config()) -> LayerState:
    """Set a per-tensor float32 scale ``amax(|W|)/448`` (floored at ``SCALE_FLOOR``), ComfyUI's layout.

    Example:
        >>> s = fp8_scale(LayerState.from_weight("fc", torch.tensor([[0.5, -4.48]])))
        >>> s.scale.shape, round(s.scale.item(), 6), s.granularity
        (torch.Size([]), 0.01, PerTensor())
    """
    if state.basis is not None:
        raise CqError(f"{state.name}: ComfyUI's float8_e4m3fn layer has no rotation; quantize FP8 layers in the "
                      "original basis (drop the convrot/QuIP stages for this layer)")
    w = state.weight.detach()
    if w.numel():
        lo, hi = torch.aminmax(w)  # abs and max are exact: no |W| copy needed
        amax = torch.maximum(-lo, hi)
    else:
        amax = torch.zeros((), dtype=w.dtype)
    scale = (amax.to(torch.float32) / E4M3_MAX).clamp(min=SCALE_FLOOR).reshape(())
    return record(state, "fp8_scale", cfg, scale=scale, granularity=PerTensor())


def fp8_input_scale(state: LayerState, *, cfg: Fp8Config = Fp8Config(input_scale=True)) -> LayerState:
    """Set ``meta["input_scale"]`` = ``max(meta["input_absmax"]) / 448`` (float32 0-dim).

    Without calibration absmax the layer keeps the runtime's dynamic activation scale, and a note says
    so (the runner prints every layer note as a ``warning:`` line).

    Example:
        >>> s = LayerState.from_weight("fc", torch.ones(2, 2), meta={"input_absmax": torch.tensor([8.96, 1.0])})
        >>> round(fp8_input_scale(s).meta["input_scale"].item(), 6)
        0.02
    """
    if not cfg.input_scale:
        return state
    absmax = state.meta.get("input_absmax", (state.meta.get("calibration") or {}).get("input_absmax"))
    if absmax is None:
        return record(state, "fp8_input_scale", cfg,
                      note="no calibration absmax for a static FP8 input_scale; the layer keeps ComfyUI's dynamic "
                           "per-call activation scale (pass calibration data, or drop input_scale)")
    amax = torch.as_tensor(absmax).detach().to(torch.float32).abs().max()
    if not bool(torch.isfinite(amax)):
        raise CqError(f"{state.name}: calibration absmax is not finite ({float(amax)}); recompute the calibration")
    scale = (amax / E4M3_MAX).clamp(min=SCALE_FLOOR).reshape(())
    return record(state, "fp8_input_scale", cfg, meta={"input_scale": scale})


def fp8_round(state: LayerState, *, cfg: Fp8Config = Fp8Config()) -> LayerState:
    """Set ``state.codes`` to the e4m3fn codes of ``weight / scale`` and the format to ``float8_e4m3fn``.

    Example:
        >>> s = fp8_round(fp8_scale(LayerState.from_weight("fc", torch.tensor([[0.5, -4.48]]))))
        >>> s.codes.dtype, s.codes.float().tolist(), s.format  # 0.5/0.01 = 50: a tie between 48 and 52, to even
        (torch.float8_e4m3fn, [[48.0, -448.0]], 'float8_e4m3fn')
    """
    if state.scale is None or not isinstance(state.granularity, PerTensor):
        raise CqError(f"{state.name}: fp8_round needs a per-tensor scale (got granularity {state.granularity!r}); "
                      "put fp8_scale before it")
    codes = quantize_e4m3(state.weight, state.scale)
    return record(state, "fp8_round", cfg, codes=codes, format=cfg.format)


def fp8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, *, input_scale: torch.Tensor | None = None,
               compute_dtype: torch.dtype = torch.bfloat16, missing_input_scale: str = "amax") -> torch.Tensor:
    """ComfyUI's FP8 forward ``y = x · Wᵀ`` with fp8 activations, as comfy-kitchen computes it (float32 out).

    ``x`` [T, K] is cast to ``compute_dtype``; ``s_x`` is ``input_scale`` or ``amax(|x|)/448``
    (computed in ``compute_dtype``, as comfy-kitchen does); ``x_q = e4m3(clamp(x · (1/s_x), ±448))``
    with the reciprocal rounded to ``compute_dtype``; the product accumulates in float32 and is
    rescaled by ``s_x · s_w``. The output is rounded to ``compute_dtype`` like the runtime's.

    ``missing_input_scale``: what a layer without ``input_scale`` gets: ``"amax"`` (comfy-kitchen
    ≥ 0.2.24's ``TensorCoreFP8Layout.quantize(scale=None)``, the installed runtime) or ``"one"``
    (ComfyUI's older in-tree layout, which cast activations to e4m3 unscaled). A static
    ``input_scale`` behaves the same on both.

    Example:
        >>> w = torch.tensor([[1.0, -2.0]]); c = quantize_e4m3(w, 1.0)
        >>> fp8_linear(torch.tensor([[4.0, 1.0]]), c, torch.tensor(1.0)).tolist()  # s_x = 4/448: 1.0 -> code 112
        [[2.0]]
    """
    xc = x.detach().reshape(-1, x.shape[-1]).to(compute_dtype)
    if missing_input_scale not in ("amax", "one"):
        raise ConfigError(f"missing_input_scale={missing_input_scale!r}; use 'amax' (comfy-kitchen) or 'one' "
                          "(older ComfyUI)")
    if input_scale is None and missing_input_scale == "one":
        s_x = torch.tensor(1.0)
    elif input_scale is None:
        s_x = (xc.abs().amax() / E4M3_MAX).to(torch.float32) if xc.numel() else torch.tensor(1.0)
    else:
        s_x = torch.as_tensor(input_scale).detach().to(torch.float32).reshape(())
    xq = (xc * (1.0 / s_x).to(compute_dtype)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    acc = xq.to(torch.float32) @ codes.to(torch.float32).t()
    return (acc * (s_x * scale.to(torch.float32))).to(compute_dtype).to(torch.float32)


def _rel(num: float, den: float) -> float:
    if den <= 0.0:
        return 0.0 if num <= 0.0 else math.inf
    return math.sqrt(num / den)


def fp8_output_error(state: LayerState, x: torch.Tensor, *, compute_dtype: torch.dtype = torch.bfloat16) -> float:
    """Relative error of ComfyUI's FP8 forward (fp8 activations) against ``x · originalᵀ`` in float64.

    Uses ``state.meta["input_scale"]`` when set (static), the dynamic scale otherwise.
    """
    if not is_fp8_state(state) or state.codes is None:
        raise CqError(f"{state.name}: fp8_output_error needs an FP8 state (format {state.format!r}); run fp8_round")
    x2 = x.detach().reshape(-1, x.shape[-1])
    w = state.original if state.original is not None else state.weight
    ref = x2.to(torch.float64) @ w.detach().to(torch.float64).t()
    y = fp8_linear(x2, state.codes, state.scale, input_scale=state.meta.get("input_scale"),
                   compute_dtype=compute_dtype)
    return _rel(float(((y.to(torch.float64) - ref) ** 2).sum()), float((ref ** 2).sum()))


@attrs.frozen(eq=False)
class Fp8MetricsConfig:
    """What :func:`measure_fp8` computes.

    ``x``: input rows [T, K] for the output errors (none: weight metrics, and ``rel_out_h`` with a
    Hessian). ``full_precision_matrix_mult``: the layer is written with that flag (text encoders
    always run so), so ComfyUI dequantizes and runs a ``compute_dtype`` matmul instead of the fp8 one:
    the runtime error is then the weight-only error in ``compute_dtype``.
    """

    x: torch.Tensor | None = attrs.field(default=None, repr=lambda t: "None" if t is None else f"Tensor{tuple(t.shape)}")
    full_precision_matrix_mult: bool = False
    compute_dtype: torch.dtype = torch.bfloat16


def _weight_only_runtime_error(state: LayerState, x: torch.Tensor, compute_dtype: torch.dtype) -> float:
    """``dequantize()`` to ``compute_dtype``, then a ``compute_dtype`` matmul (the fpmm / LoRA path)."""
    w = state.original if state.original is not None else state.weight
    x2 = x.detach().reshape(-1, x.shape[-1])
    ref = x2.to(torch.float64) @ w.detach().to(torch.float64).t()
    deq = (state.codes.to(compute_dtype) * state.scale.to(compute_dtype))
    y = (x2.to(compute_dtype) @ deq.t()).to(torch.float64)
    return _rel(float(((y - ref) ** 2).sum()), float((ref ** 2).sum()))


def measure_fp8(state: LayerState, *, cfg: Fp8MetricsConfig | MetricsConfig = Fp8MetricsConfig()) -> LayerState:
    """:func:`~cq.transforms.measure` for FP8 layers: the same weight and output metrics, and ``w8a8`` =
    the error of the forward ComfyUI runs for this layer (fp8 activations, :func:`fp8_output_error`;
    with ``full_precision_matrix_mult`` the dequantized bf16 matmul).

    Records ``sqnr_db``, ``mse``, ``max_error``; with ``cfg.x`` also ``rel_out_x`` (weight-only, float32)
    and ``w8a8``; with a Hessian ``rel_out_h``. A plain :class:`~cq.transforms.MetricsConfig` is
    accepted (its ``x`` is used; no fpmm, bf16 compute).

    Example:
        >>> s = fp8_round(fp8_scale(LayerState.from_weight("fc", torch.randn(8, 16))))
        >>> m = measure_fp8(s, cfg=Fp8MetricsConfig(x=torch.randn(4, 16))).metrics
        >>> sorted(m), 25 < m["sqnr_db"] < 40
        (['max_error', 'mse', 'rel_out_x', 'sqnr_db', 'w8a8'], True)
    """
    if not is_fp8_state(state) or state.codes is None:
        raise CqError(f"{state.name}: measure_fp8 needs an FP8 state (format {state.format!r}); use measure for int8")
    fpmm = bool(getattr(cfg, "full_precision_matrix_mult", False))
    compute_dtype = getattr(cfg, "compute_dtype", torch.bfloat16)
    original = state.original if state.original is not None else state.weight
    deq = working_dequantized(state)  # FP8 layers have no basis: the working basis is the original one
    m = weight_metrics(original, deq)
    if cfg.x is not None:
        m["rel_out_x"] = rel_output_error(original, deq, x=cfg.x)
        m["w8a8"] = (_weight_only_runtime_error(state, cfg.x, compute_dtype) if fpmm
                     else fp8_output_error(state, cfg.x, compute_dtype=compute_dtype))
    if state.hessian is not None:
        m["rel_out_h"] = rel_output_error(state.weight, deq, hessian=state.hessian)
    return record(state, "measure_fp8", cfg, metrics=m)


def fp8_pipeline(cfg: Fp8Config = Fp8Config()):
    """check_finite → fp8_scale → [fp8_input_scale] → fp8_round: cq's FP8 recipe.

    Example:
        >>> fp8_pipeline().names
        ('check_finite', 'fp8_scale', 'fp8_round')
        >>> fp8_pipeline(Fp8Config(input_scale=True)).names
        ('check_finite', 'fp8_scale', 'fp8_input_scale', 'fp8_round')
    """
    from ..pipeline import pipeline, stage
    from .checks import check_finite

    stages = [check_finite, stage(fp8_scale, cfg)]
    if cfg.input_scale:
        stages.append(stage(fp8_input_scale, cfg))
    stages.append(stage(fp8_round, cfg))
    return pipeline(*stages)


def fp8_measure_stage(state: LayerState, tokens: int, seed: int, *, full_precision_matrix_mult: bool = False):
    """A ``measure_fp8`` stage on the same per-layer inputs as :func:`cq.recipes.measure_stage`."""
    from ..pipeline import stage
    from ..recipes import metrics_inputs

    x = metrics_inputs(state, tokens, seed)
    return stage(measure_fp8, Fp8MetricsConfig(x=None if x is None else x.to(state.weight.device),
                                                full_precision_matrix_mult=full_precision_matrix_mult))
