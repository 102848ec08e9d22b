"""Laws of cq's rotations (cq.transforms.hadamard, incoherence, convrot): orthogonality, exact inverses,
norms and proxy loss kept, determinism from the seed, every size from 1 to 300."""

import pytest

pytest.importorskip("hypothesis")

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from cq import LayerState
from cq.transforms.convrot import ConvRot, ConvRotConfig, convrot
from cq.transforms.hadamard import orthogonal_transform, transform_plan
from cq.transforms.incoherence import IncoherenceConfig, incoherence, make_incoherence, rescale_factors

F64 = torch.float64
sizes = st.integers(1, 300)
seeds = st.integers(0, 2**31 - 1)


def _rand(shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


@given(sizes, seeds, st.booleans())
@example(1, 0, True)
@example(86, 1, True)  # Sylvester 2 ⊗ random 43: the fallback path
@example(300, 2, True)  # Paley 12 ⊗ random 25
@example(1018, 3, True)  # 2 · 509: a prime above the random-factor group limit gets one dense factor
@example(2, 4, False)
def test_transforms_are_orthogonal_and_invertible(n, seed, use_hadamard):
    t = orthogonal_transform(n, seed=seed, use_hadamard=use_hadamard)
    x = _rand((3, n), seed)
    y = t.apply(x)
    assert torch.allclose(t.apply_t(y), x, atol=1e-10)
    assert torch.allclose(torch.linalg.vector_norm(y, dim=1), torch.linalg.vector_norm(x, dim=1), rtol=1e-12)
    if n <= 300:
        m = t.matrix()
        assert torch.allclose(m @ m.T, torch.eye(n, dtype=F64), atol=1e-12)


@given(sizes, seeds)
@example(12, 0)
def test_transforms_are_deterministic_from_the_seed(n, seed):
    a = orthogonal_transform(n, seed=seed).apply(_rand((2, n), 7))
    b = orthogonal_transform(n, seed=seed).apply(_rand((2, n), 7))
    assert torch.equal(a, b)


@given(sizes)
def test_hadamard_plans_multiply_to_n(n):
    plan = transform_plan(n)
    sizes_ = [s for _, s in plan.factors]
    assert torch.tensor(sizes_).prod().item() == n
    assert all(s <= 256 or kind == "random" for kind, s in plan.factors)


@given(st.integers(1, 300), st.integers(1, 300), seeds, st.booleans(), st.booleans(), st.booleans())
@example(1, 1, 0, True, True, True)
@example(43, 86, 5, True, True, True)
@example(7, 300, 6, False, True, False)
def test_incoherence_inverse_and_proxy_loss_invariance(n, k, seed, use_hadamard, rescale, permute):
    w = _rand((n, k), seed)
    x = _rand((k + 4, k), seed + 1)
    h = x.T @ x / (k + 4)
    cfg = IncoherenceConfig(seed=seed % 1000, use_hadamard=use_hadamard, rescale=rescale, permute=permute)
    inc = make_incoherence(n, k, cfg, d=rescale_factors(w, h) if rescale else None)
    w2, h2 = inc.forward_weight(w), inc.forward_hessian(h)
    assert torch.allclose(inc.inverse_weight(w2), w, atol=1e-9)
    assert torch.allclose(inc.inverse_hessian(h2), h, atol=1e-9)
    loss, loss2 = torch.trace(w @ h @ w.T), torch.trace(w2 @ h2 @ w2.T)
    assert torch.allclose(loss2, loss, rtol=1e-9)
    if not rescale:
        assert torch.allclose(torch.linalg.matrix_norm(w2), torch.linalg.matrix_norm(w), rtol=1e-12)


@given(st.integers(1, 64), st.integers(1, 64), seeds)
def test_incoherence_stage_never_modifies_its_input_and_is_seeded(n, k, seed):
    w = _rand((n, k), seed).float()
    w0 = w.clone()
    s = LayerState.from_weight("fc", w)
    a = incoherence(s, cfg=IncoherenceConfig(seed=seed % 97))
    b = incoherence(s, cfg=IncoherenceConfig(seed=seed % 97))
    assert torch.equal(w, w0) and torch.equal(a.weight, b.weight)


@given(st.integers(1, 16), st.sampled_from([16, 64, 256]), seeds)
@example(1, 256, 0)
def test_convrot_is_orthogonal_and_keeps_the_proxy_loss(groups, g, seed):
    k = min(groups * g, 1024)  # 1024 is a multiple of every g here
    w = _rand((5, k), seed)
    x = _rand((32, k), seed + 1)  # a low-rank H is enough for the trace law and keeps this cheap
    h = (x.T @ x).to(torch.float32)
    s = convrot(LayerState.from_weight("fc", w.float(), hessian=h), cfg=ConvRotConfig(groupsize=g))
    rot = s.basis
    assert rot == ConvRot(g)
    assert torch.allclose(rot.unrotate(rot.rotate(w)), w, atol=1e-12)
    assert torch.allclose(torch.linalg.matrix_norm(rot.rotate(w)), torch.linalg.matrix_norm(w), rtol=1e-12)
    wr, hr = s.weight.to(F64), s.hessian.to(F64)
    assert torch.allclose(torch.trace(wr @ hr @ wr.T), torch.trace(w @ h.to(F64) @ w.T), rtol=1e-4)
