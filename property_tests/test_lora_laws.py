"""Laws of the LoRA merge (cq.lora, cq.transforms.lora): identity, linearity, inputs untouched."""

import pytest

pytest.importorskip("hypothesis")

import torch  # noqa: E402
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cq.lora import merge_lora_into_weight, merge_multiple_loras  # noqa: E402
from cq.state import LayerState  # noqa: E402
from cq.transforms.lora import MergeLoraConfig, merge_lora  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def lora_problems(draw, *, dtypes=st.sampled_from(DTYPES)):
    """``(W, A, B, alpha, rank)`` drawn as sizes + a seed, materialized with a seeded generator."""
    n = draw(st.integers(1, 24))
    k = draw(st.integers(1, 24))
    r = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    w_scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    dtype = draw(dtypes)
    alpha = draw(st.floats(0.25, 64.0))
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * w_scale).to(dtype)
    a = torch.randn(r, k, generator=g) * 0.2
    b = torch.randn(n, r, generator=g) * 0.2
    return w, a, b, alpha, r


@given(lora_problems(), st.floats(-4.0, 4.0))
@example((torch.tensor([[65504.0]], dtype=torch.float16), torch.ones(1, 1), torch.zeros(1, 1), 1.0, 1), 1.0)
def test_zero_lora_is_the_identity(problem, scale):
    w, a, _, alpha, r = problem
    b0 = torch.zeros(w.shape[0], r)
    merged = merge_lora_into_weight(w, a, b0, alpha, r, scale)
    assert merged.dtype == w.dtype and torch.equal(merged, w)
    assert torch.equal(merge_multiple_loras(w, [{"lora_A": a, "lora_B": b0, "alpha": alpha, "rank": r}] * 2), w)
    state = merge_lora(LayerState.from_weight("fc", w), cfg=MergeLoraConfig([(a, b0, alpha, r, scale)]))
    assert torch.equal(state.weight, w.to(state.weight.dtype))


@given(lora_problems(dtypes=st.just(torch.float64)), st.floats(-3.0, 3.0), st.floats(-3.0, 3.0))
def test_merge_is_linear_in_scale(problem, s1, s2):
    w, a, b, alpha, r = problem
    d1 = merge_lora_into_weight(w, a, b, alpha, r, s1) - w
    d2 = merge_lora_into_weight(w, a, b, alpha, r, s2) - w
    d12 = merge_lora_into_weight(w, a, b, alpha, r, s1 + s2) - w
    # float64 throughout: the only error is rounding W + Δ, a few ulps of |W| + |Δ|
    tol = 8 * torch.finfo(torch.float64).eps * (w.abs() + d1.abs() + d2.abs() + d12.abs() + 1e-300)
    assert bool(((d12 - d1 - d2).abs() <= tol).all())


@given(lora_problems(), st.floats(-2.0, 2.0), st.booleans())
def test_inputs_are_never_modified(problem, scale, dampen):
    w, a, b, alpha, r = problem
    before = [t.clone() for t in (w, a, b)]
    ptrs = [t.data_ptr() for t in (w, a, b)]
    out1 = merge_lora_into_weight(w, a, b, alpha, r, scale)
    out2 = merge_multiple_loras(w, [{"lora_A": a, "lora_B": b, "alpha": alpha, "rank": r, "scale": scale}] * 2,
                                dampen=dampen)
    state = LayerState.from_weight("fc", w)
    out3 = merge_lora(state, cfg=MergeLoraConfig([(a, b, alpha, r, scale)], dampen=dampen))
    for t, ref, p in zip((w, a, b), before, ptrs):
        assert torch.equal(t, ref) and t.data_ptr() == p
    assert state.weight is w and state.original is w and state.history == ()
    for out in (out1, out2, out3.weight):
        assert out.data_ptr() != w.data_ptr()


@given(lora_problems(dtypes=st.sampled_from([torch.float32, torch.bfloat16])), st.floats(-2.0, 2.0))
def test_transform_equals_the_function_before_the_final_rounding(problem, scale):
    w, a, b, alpha, r = problem
    state = merge_lora(LayerState.from_weight("fc", w), cfg=MergeLoraConfig([(a, b, alpha, r, scale)]))
    assert state.weight.dtype == torch.float32
    assert torch.equal(state.weight.to(w.dtype), merge_lora_into_weight(w, a, b, alpha, r, scale))
