"""Pure transforms ``f(state, *, cfg) -> state`` over :class:`~cq.state.LayerState`."""

from .checks import check_finite, check_linear
from .metrics import MetricsConfig, measure, mse, rel_output_error, sqnr_db, w8a8_output_error
from .rounding import RoundConfig, dequantize, fp16_cast, int8_format, reconstruct, round_to_nearest
from .scales import ScaleConfig, absmax_scale, compute_scale, expand_scale

__all__ = [
    "check_finite",
    "check_linear",
    "ScaleConfig",
    "absmax_scale",
    "compute_scale",
    "expand_scale",
    "RoundConfig",
    "round_to_nearest",
    "dequantize",
    "reconstruct",
    "fp16_cast",
    "int8_format",
    "MetricsConfig",
    "measure",
    "mse",
    "sqnr_db",
    "rel_output_error",
    "w8a8_output_error",
]
