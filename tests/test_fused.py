"""fused_rtn is the default RTN recipe (check_finite → absmax_scale → round_to_nearest → measure) in one pass."""

from __future__ import annotations

import pytest
import torch

from cq.errors import ConfigError, InputError, NonFiniteWeightError
from cq.kernels import implementations
from cq.state import LayerState, PerRow
from cq.transforms import MetricsConfig, absmax_scale, check_finite, measure, round_to_nearest
from cq.transforms.fused import FusedRTNConfig, fused_rtn
from tests.float_bounds import db_gap, sum_sq_rel

BACKENDS = [i.name for i in implementations("quantize_rows") if not i.available()]


def _unfused(state: LayerState) -> LayerState:
    return measure(round_to_nearest(absmax_scale(check_finite(state))), cfg=MetricsConfig())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_same_state_as_the_unfused_recipe(backend, dtype):
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(96, 80, generator=g) * torch.logspace(-3, 1, 96).unsqueeze(1)).to(dtype)
    w[5] = 0
    s = LayerState.from_weight("blk.fc", w)
    a = fused_rtn(s, cfg=FusedRTNConfig(backend=backend))
    b = _unfused(s)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert a.granularity == b.granularity == PerRow() and a.format == b.format
    assert sorted(a.metrics) == sorted(b.metrics)
    # measure sums all N·K squares in one float32 vector_norm (≤ γ_{NK+2} relative, any order); the
    # kernel sums K per row (≤ γ_{K+2}; float64 in numba) and adds the rows in float64: the two agree to
    # the sum of those. SQNR moves by ≤ 10/ln10 times the relative errors of signal and noise.
    # A wrong scale or a dropped row changes both by orders of magnitude more.
    n, k = w.shape
    rel = sum_sq_rel(n * k) + sum_sq_rel(k)  # 7680 + 80 terms: 4.6e-4
    assert a.metrics["mse"] == pytest.approx(b.metrics["mse"], rel=rel)
    assert a.metrics["sqnr_db"] == pytest.approx(b.metrics["sqnr_db"], abs=db_gap(rel, rel))
    assert a.metrics["max_error"] == b.metrics["max_error"]  # one float32 subtraction per element: exact
    assert a.weight is s.weight and a.history[-1][0] == "fused_rtn"


def test_non_finite_weight_is_refused_like_check_finite():
    w = torch.randn(4, 8)
    w[2, 3] = float("inf")
    with pytest.raises(NonFiniteWeightError, match=r"0 NaN and 1 Inf values \(first at \[2, 3\]\)"):
        fused_rtn(LayerState.from_weight("fc", w))


def test_bad_inputs():
    with pytest.raises(InputError, match="2-D"):
        fused_rtn(LayerState.from_weight("fc", torch.ones(3)))
    with pytest.raises(ConfigError, match="backend='cuda-magic'"):
        FusedRTNConfig(backend="cuda-magic")


def test_metrics_off_and_rotated_states_record_none():
    w = torch.randn(8, 16)
    assert not fused_rtn(LayerState.from_weight("fc", w), cfg=FusedRTNConfig(metrics=False)).metrics
    rotated = LayerState(name="fc", weight=w.flip(1), original=w)
    assert not fused_rtn(rotated).metrics
