"""Laws of cq's GPTQ and LDLQ (gptq_update, ldlq): never worse than RTN, RTN on H = I, GPTQ ≡ LDLQ,
act-order = permuted problem, invariance to the Hessian's scale, inputs untouched."""

import pytest

pytest.importorskip("hypothesis")

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cq import LayerState, PerBlock, PerGroup, PerRow, PerTensor
from cq.transforms import ScaleConfig, absmax_scale, round_to_nearest
from cq.transforms.gptq import GPTQConfig, gptq_update
from cq.transforms.hessian import DampingConfig
from cq.transforms.ldlq import LDLQConfig, ldlq
from cq.transforms.rounding import working_dequantized

granularities = st.sampled_from([PerTensor(), PerRow(), PerGroup(4), PerBlock(4)])


@st.composite
def problems(draw, *, degenerate=True):
    """(W [N, K], H [K, K]) from drawn sizes, seeds and magnitudes, materialized with seeded generators.

    H is 2/T·XᵀX of correlated inputs (T may be < K: rank-deficient) with optional dead inputs and
    outlier channels, scaled by 10^e; ``degenerate`` adds zero, all-ones and indefinite matrices.
    """
    n = draw(st.integers(1, 12)) * 2
    k = draw(st.integers(1, 10)) * 4
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-20, 0.02, 1.0, 1e4]))
    if draw(st.booleans()):
        w[draw(st.integers(0, n - 1))] = 0
    kind = draw(st.sampled_from(["data", "data", "data", "zero", "ones", "indefinite"] if degenerate else ["data"]))
    t = draw(st.integers(1, 3 * k))
    mix = torch.randn(k, k, generator=g, dtype=torch.float64)
    x = torch.randn(t, k, generator=g, dtype=torch.float64) @ mix
    if draw(st.booleans()):
        x[:, torch.randint(0, k, (1,), generator=g)] *= 30
    if draw(st.booleans()):
        x[:, torch.randint(0, k, (max(1, k // 8),), generator=g)] = 0  # dead inputs
    h = 2.0 / t * x.T @ x
    if kind == "zero":
        h = torch.zeros(k, k, dtype=torch.float64)
    elif kind == "ones":
        h = torch.ones(k, k, dtype=torch.float64)
    elif kind == "indefinite":
        h = h - 2 * float(h.diagonal().mean()) * torch.eye(k, dtype=torch.float64)
    h = h * 10.0 ** draw(st.sampled_from([-12, 0, 12]))
    return w.to(torch.float32), h.to(torch.float32)


def scaled(w, h, gran=PerRow()):
    return absmax_scale(LayerState.from_weight("blk.fc", w, hessian=h), cfg=ScaleConfig(gran))


def proxy(state, h):
    """The stored layer's proxy loss, evaluated in float64 (the codes dequantized in float32, as the
    runtime does). cq decides "never worse than RTN" on this same quantity for small problems; a float32
    evaluation would differ by ~K·2⁻²⁴ of Σ|e||H||e| — more than the 1e-9 the laws allow on near-ties."""
    e = state.weight.double() - working_dequantized(state).double()
    w = state.weight.double()
    h64 = h.double()
    den = float(((w @ h64) * w).sum())
    return (max(float(((e @ h64) * e).sum()), 0.0) / den) ** 0.5 if den > 0 else 0.0


_I_CASE = (torch.tensor([[0.5, -1.5, 2.5, 0.0]]), torch.eye(4))


@given(problems(), granularities, st.booleans(), st.sampled_from(["gptq", "ldlq"]))
@example(_I_CASE, PerRow(), False, "gptq")
@example((torch.zeros(2, 4), torch.zeros(4, 4)), PerTensor(), True, "ldlq")  # all-zero weight and Hessian
@example((torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 3.0], [3.0, 1.0]])), PerRow(), False, "gptq")  # indefinite
@example((torch.randn(2, 20, generator=torch.Generator().manual_seed(5)) * 0.02, torch.ones(20, 20)), PerRow(), False,
         "gptq")  # rank-1 all-ones Hessian: GPTQ and RTN tie to float32 rounding (found by the ci profile)
def test_never_worse_than_rtn_on_the_layer_hessian(problem, gran, actorder, method):
    problem_w, problem_h = problem
    s = scaled(problem_w, problem_h, gran)
    if method == "gptq":
        out = gptq_update(s, cfg=GPTQConfig(actorder=actorder, block_size=8))
    else:
        out = ldlq(s, cfg=LDLQConfig(actorder=actorder, block_size=8))
    rtn = round_to_nearest(s)
    assert out.codes.dtype == torch.int8 and out.codes.shape == problem_w.shape
    assert int(out.codes.abs().max()) <= 127
    if torch.isfinite(problem_h).all():
        assert proxy(out, problem_h) <= proxy(rtn, problem_h) * (1 + 1e-9) + 1e-30


@given(st.integers(1, 16), st.integers(1, 32), st.integers(0, 2**31 - 1), granularities,
       st.sampled_from([0.0, 0.01, 1.0]), st.sampled_from([1e-8, 1.0, 1e8]), st.booleans())
def test_scaled_identity_hessian_is_rtn_code_for_code(n, k, seed, gran, percdamp, c, actorder):
    w = torch.randn(n * 4, k * 4, generator=torch.Generator().manual_seed(seed))
    s = scaled(w, c * torch.eye(k * 4), gran)
    expected = round_to_nearest(s).codes
    damping = DampingConfig(percdamp=percdamp)
    assert torch.equal(gptq_update(s, cfg=GPTQConfig(damping=damping, actorder=actorder)).codes, expected)
    assert torch.equal(ldlq(s, cfg=LDLQConfig(damping=damping, actorder=actorder)).codes, expected)


@settings(max_examples=15)
@given(problems(degenerate=False), st.sampled_from([PerRow(), PerGroup(4)]), st.booleans(), st.integers(1, 9))
def test_gptq_and_ldlq_give_the_same_codes(problem, gran, actorder, block):
    problem_w, problem_h = problem
    s = scaled(problem_w, problem_h, gran)
    common = dict(actorder=actorder, block_size=block, never_worse_than_rtn=False, precision="float64")
    g = gptq_update(s, cfg=GPTQConfig(**common))
    q = ldlq(s, cfg=LDLQConfig(**common))
    assert torch.equal(g.codes, q.codes)


@settings(max_examples=15)
@given(problems(degenerate=False), st.integers(-20, 20))
def test_codes_invariant_to_power_of_two_hessian_scale(problem, j):
    problem_w, problem_h = problem
    s = scaled(problem_w, problem_h)
    s2 = scaled(problem_w, problem_h * 2.0**j)
    cfg = GPTQConfig(never_worse_than_rtn=False, metrics=False)
    assert torch.equal(gptq_update(s, cfg=cfg).codes, gptq_update(s2, cfg=cfg).codes)


@settings(max_examples=15)
@given(problems(degenerate=False))
def test_actorder_is_gptq_on_the_permuted_problem(problem):
    problem_w, problem_h = problem
    perm = torch.argsort(problem_h.diagonal(), descending=True, stable=True)
    cfg = GPTQConfig(never_worse_than_rtn=False, metrics=False, precision="float64")
    ordered = gptq_update(scaled(problem_w, problem_h), cfg=GPTQConfig(actorder=True, never_worse_than_rtn=False,
                                                                        metrics=False, precision="float64"))
    manual = gptq_update(scaled(problem_w[:, perm], problem_h[perm][:, perm]), cfg=cfg)
    assert torch.equal(ordered.codes[:, perm], manual.codes)


@settings(max_examples=10)
@given(problems(), granularities)
def test_inputs_untouched_and_deterministic(problem, gran):
    problem_w, problem_h = problem
    s = scaled(problem_w, problem_h, gran)
    w0, h0, s0 = problem_w.clone(), problem_h.clone(), s.scale.clone()
    a = gptq_update(s, cfg=GPTQConfig(actorder=True))
    b = gptq_update(s, cfg=GPTQConfig(actorder=True))
    assert torch.equal(problem_w, w0) and torch.equal(problem_h, h0) and torch.equal(s.scale, s0)
    assert torch.equal(a.codes, b.codes) and a.weight is s.weight and a.scale is s.scale
