"""Tests for cq.pipeline and cq.state: composition, naming, immutability, history."""

import attrs
import pytest
import torch

from cq import ConfigError, LayerState, PerRow, PerTensor, pipeline, stage, tap
from cq.transforms import MetricsConfig, ScaleConfig, absmax_scale, measure, round_to_nearest


def _state(seed=0, shape=(16, 32)):
    g = torch.Generator().manual_seed(seed)
    return LayerState.from_weight("blk.0.fc", torch.randn(shape, generator=g))


def test_pipeline_equals_nested_calls():
    s = _state()
    p = pipeline(stage(absmax_scale, ScaleConfig(PerTensor())), round_to_nearest)
    by_pipe = p(s)
    by_hand = round_to_nearest(absmax_scale(s, cfg=ScaleConfig(PerTensor())))
    assert torch.equal(by_pipe.codes, by_hand.codes)
    assert torch.equal(by_pipe.scale, by_hand.scale)
    assert by_pipe.stage_names() == ("absmax_scale", "round_to_nearest")


def test_empty_pipeline_is_identity():
    s = _state()
    assert pipeline()(s) is s


def test_duplicate_names_rejected_with_fix():
    with pytest.raises(ConfigError, match="unique names.*rename"):
        pipeline(absmax_scale, absmax_scale)


def test_pipeline_editing_returns_new_pipelines():
    p = pipeline(stage(absmax_scale, ScaleConfig()), round_to_nearest)
    q = p.then(stage(measure, MetricsConfig()))
    assert p.names == ("absmax_scale", "round_to_nearest")
    assert q.names == ("absmax_scale", "round_to_nearest", "measure")
    r = q.replace("absmax_scale", stage(absmax_scale, ScaleConfig(PerTensor()), name="tensor_scale"))
    assert r.names[0] == "tensor_scale"
    assert r(_state()).scale.shape == ()
    assert q.without("measure").names == p.names
    assert q.insert_before("round_to_nearest", tap(lambda s: None, name="peek")).names[1] == "peek"
    with pytest.raises(KeyError, match="stages are"):
        q.replace("nope", round_to_nearest)


def test_tap_sees_state_and_changes_nothing():
    seen = []
    s = _state()
    out = pipeline(tap(seen.append))(s)
    assert out is s and seen == [s]


def test_states_are_frozen_and_inputs_untouched():
    s = _state()
    before = s.weight.clone()
    out = pipeline(stage(absmax_scale, ScaleConfig(PerRow())), round_to_nearest, measure)(s)
    assert torch.equal(s.weight, before)
    assert s.codes is None and s.history == ()
    assert out.weight is s.weight  # quantizers never overwrite the float target
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        out.codes = None  # type: ignore[misc]


def test_meta_is_read_only():
    s = _state()
    with pytest.raises(TypeError):
        s.meta["x"] = 1  # type: ignore[index]


def test_repr_is_readable():
    text = repr(round_to_nearest(absmax_scale(_state())))
    assert "int8[16, 32]" in text and "round_to_nearest" in text
