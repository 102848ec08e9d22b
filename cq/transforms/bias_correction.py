"""Bias correction from real calibration data: fold the expected output error into the layer's bias.

With calibration input mean ``μ`` (original basis) the quantized layer's expected output misses the
float one by ``δ = W·μ − E[ŷ]``. Weight-only runtimes compute ``ŷ = Ŵ·x``, so ``δ = (W − Ŵ)·μ``;
ComfyUI's W8A8 runtime computes ``ŷ = Ŵ_w·x̃_w`` (working basis, per-token int8 activations), so
``δ`` also carries ``−Ŵ_w·ē`` with ``ē`` the mean activation rounding error
(:class:`cq.calibrate.ActivationStats`). The correction adds ``δ`` to the existing bias; a layer
without a bias is left alone (no new keys in the file), and without data nothing is invented.
"""

from __future__ import annotations

import attrs
import torch

from ..errors import ConfigError, InputError
from ..state import LayerState, record
from .rounding import reconstruct, working_dequantized

__all__ = ["BiasCorrectionConfig", "bias_correction", "expected_output_error"]


def _bool(instance, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name}={value!r} must be True or False")


@attrs.frozen
class BiasCorrectionConfig:
    """``w8a8``: include the mean activation rounding error of ComfyUI's int8 path (needs
    ``state.meta["w8a8_stats"]`` for the state's basis; without them only ``(W − Ŵ)·μ`` is used,
    with a note).

    Example:
        >>> BiasCorrectionConfig().w8a8
        True
    """

    w8a8: bool = attrs.field(default=True, validator=_bool)


def _input_mean(state: LayerState) -> torch.Tensor | None:
    cal = state.meta.get("calibration") or {}
    mu = cal.get("input_mean") if hasattr(cal, "get") else None
    if mu is None:
        return None
    if tuple(mu.shape) != (state.shape[1],):
        raise InputError(f"{state.name}: calibration input_mean has shape {tuple(mu.shape)}, the weight has "
                         f"in_features={state.shape[1]}; the calibration file belongs to another model")
    return mu


def expected_output_error(state: LayerState, mu: torch.Tensor, err_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``δ = W·μ − (Ŵ·μ + Ŵ_w·ē)``, float64 ``[N]``: what the quantized layer misses on average.

    ``mu``: original-basis input mean; ``err_mean``: the mean activation rounding error in the
    working basis (``None``: weight-only runtime).

    Example:
        >>> from cq.transforms import absmax_scale, round_to_nearest
        >>> s = round_to_nearest(absmax_scale(LayerState.from_weight("fc", torch.tensor([[1.0, 0.004]]))))
        >>> [round(v, 6) for v in expected_output_error(s, torch.tensor([0.0, 1.0])).tolist()]
        [-0.003874]
    """
    f64 = torch.float64
    original = (state.original if state.original is not None else state.weight).to(f64)
    delta = (original - reconstruct(state).to(f64)) @ mu.to(f64)
    if err_mean is not None:
        delta = delta - working_dequantized(state).to(f64) @ err_mean.to(f64)
    return delta


def bias_correction(state: LayerState, *, cfg: BiasCorrectionConfig = BiasCorrectionConfig()) -> LayerState:
    """Add the expected output error of the quantized layer to its bias (calibration means only).

    Runs after rounding. Leaves the state unchanged, with a note, when the layer has no bias (no
    new tensor is created) or no calibration input mean (``meta["calibration"]["input_mean"]``, set
    by :func:`cq.io.calibration.attach_calibration`): a correction without data would be noise.

    Example:
        >>> from cq.transforms import absmax_scale, round_to_nearest
        >>> w = torch.tensor([[1.0, 0.004]])
        >>> s = LayerState.from_weight("fc", w, bias=torch.zeros(1),
        ...                            meta={"calibration": {"input_mean": torch.tensor([0.0, 1.0])}})
        >>> out = bias_correction(round_to_nearest(absmax_scale(s)))
        >>> round(float(out.bias), 6), out.metrics["bias_shift_rel"] > 0
        (-0.003874, True)
    """
    if state.codes is None:
        raise ConfigError(f"{state.name}: bias_correction runs after rounding (the state has no codes); "
                          "put it after round_to_nearest / ldlq / gptq_update")
    if state.bias is None:
        return record(state, "bias_correction", cfg, note="bias_correction: layer has no bias; left alone")
    mu = _input_mean(state)
    if mu is None:
        return record(state, "bias_correction", cfg,
                      note="bias_correction skipped: no calibration input mean for this layer (needs "
                           "--calibration-data from cq.calibrate.capture); a correction without data would be noise")
    err_mean, note = None, None
    if cfg.w8a8:
        from .w8a8_round import stats_for_state

        st = stats_for_state(state)
        if st is None:
            note = "bias_correction: no W8A8 statistics for this basis; corrected the weight error only"
        else:
            err_mean = st.err_mean
    delta = expected_output_error(state, mu, err_mean)
    b64 = state.bias.to(torch.float64)
    new_bias = (b64 + delta).to(state.bias.dtype)
    ref = float(b64.abs().max()) or 1.0
    return record(state, "bias_correction", cfg, note=note, bias=new_bias,
                  metrics={"bias_shift_rel": float(delta.abs().max()) / ref})
