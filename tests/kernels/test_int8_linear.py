"""Parity of every registered ``int8_linear`` with the torch reference.

Three levels, each as strict as the math allows: the dynamic activation codes and scales bit for bit,
the int32 accumulators exactly, and the float32 output within the worst-case rounding of its float32
epilogue (``float(acc)·s_x·s_w + b``: four roundings, see :func:`_assert_within_epilogue_rounding`)
against the same epilogue done in float64 from the exact codes.
"""

from __future__ import annotations

import pytest
import torch

from cq.kernels import implementations, int8_linear_ref, not_supported_reasons, quantize_activations_ref
from cq.errors import UnsupportedBackendError
from cq.kernels import triton_kernels as tk
from tests.float_bounds import U32, gamma

IMPLS = [pytest.param(impl, id=impl.name) for impl in implementations("int8_linear")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (T, K, N): single element, odd sizes, one full interpreter block, and K spanning several K-blocks.
SHAPES = [(1, 1, 1), (3, 5, 7), (17, 33, 9), (64, 128, 64), (5, 1100, 3)]


def _skip_unless_triton_runs_on(device):
    """The Triton helpers below have no impl of their own; skip with the linear impl's reasons."""
    triton_impl = next((i for i in implementations("int8_linear") if i.name == "triton"), None)
    if triton_impl is None:
        pytest.skip("no triton implementation registered")
    why = not_supported_reasons(triton_impl, torch.empty(0, device=device), torch.empty(0, 0, dtype=torch.int8,
                                device=device), torch.empty((), device=device))
    why = [w for w in why if "does not end in K" not in w and "K = 0" not in w]  # shape checks: n/a here
    if why:
        pytest.skip(f"triton: {'; '.join(why)}")


def _activations(shape, dtype, device, seed, awkward, ties, extreme=False):
    """Awkward activations plus a row of exact ties: absmax 127·2^e makes the scale exactly 2^e."""
    # No near-dtype-max value here: it would overflow the float32 output, in the reference too.
    x = awkward(shape, dtype=dtype, seed=seed, device=device, extreme=extreme)
    t, k = shape
    if t > 2 and k > 1:
        step = torch.tensor([[2.0 ** -3]])
        row = ties(torch.zeros(1, k, dtype=dtype, device=device), step, seed=seed + 1, lo=-127, hi=126)
        row[0, 0] = 127 * 2.0 ** -3
        x[2] = row[0]
    return x


def _codes(n, k, seed, device):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    if n > 1:
        codes[0] = 127  # a saturated row
    return codes.to(device)


def _exact_epilogue(x, codes, scale, bias):
    """The reference's math in float64 from its own (exact) codes and scales: the ideal output ``y64``,
    and ``|acc·s_x·s_w| + |b|``, the size its float32 rounding error scales with."""
    qx, sx = quantize_activations_ref(x.reshape(-1, x.shape[-1]))
    acc = qx.cpu().long() @ codes.cpu().long().t()
    sw = scale.double().cpu().reshape(1, -1) if scale.numel() > 1 else scale.double().cpu()
    y = acc.double() * sx.double().cpu() * sw  # one float64 rounding (2⁻⁵³): exact next to float32's
    size = y.abs()
    if bias is not None:
        y = y + bias.double().cpu()
        size = size + bias.double().cpu().abs()
    shape = (*x.shape[:-1], codes.shape[0])
    return y.reshape(shape), size.reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 33), (64, 128), (70, 1100)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_activation_codes_bit_exact(dtype, shape, layout, device, awkward, ties):
    _skip_unless_triton_runs_on(device)
    x = _activations(shape, dtype, device, seed=shape[0] * 1000 + shape[1], awkward=awkward, ties=ties,
                     extreme=True)
    if layout == "transposed":
        x = x.t().contiguous().t()
    q, s = tk.quantize_activations_triton(x)
    q_ref, s_ref = quantize_activations_ref(x)
    assert torch.equal(s.cpu(), s_ref.cpu())
    assert torch.equal(q.cpu(), q_ref.cpu())


@pytest.mark.parametrize("mnk", [(1, 1, 1), (3, 7, 5), (17, 9, 33), (64, 64, 128), (130, 129, 300)],
                         ids=lambda s: "x".join(map(str, s)))
def test_int32_accumulators_exact(mnk, device):
    _skip_unless_triton_runs_on(device)
    m, n, k = mnk
    g = torch.Generator().manual_seed(m * n * k)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8).to(device)
    b = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8).t().to(device)  # non-contiguous
    c = tk.int8_matmul_triton(a, b)
    assert c.dtype == torch.int32
    assert torch.equal(c.cpu().long(), a.cpu().long() @ b.cpu().long().t())


def test_int32_accumulators_at_the_extremes(device):
    _skip_unless_triton_runs_on(device)
    k = 1000  # 1000 · 128 · 127 = 16,256,000: past float32's exact-integer range, well inside int32
    a = torch.full((3, k), -128, dtype=torch.int8, device=device)
    b = torch.full((2, k), -127, dtype=torch.int8, device=device)
    b[1, ::2] = 127
    c = tk.int8_matmul_triton(a, b).cpu()
    assert c[:, 0].tolist() == [16_256_000] * 3
    assert c[:, 1].tolist() == [0] * 3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_row", [True, False], ids=["scale_N1", "scale_scalar"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_output_matches_reference(impl, dtype, shape, per_row, with_bias, device, awkward, ties,
                                  skip_unless_supported):
    t, k, n = shape
    seed = t * 7919 + k * 31 + n
    x = _activations((t, k), dtype, device, seed=seed, awkward=awkward, ties=ties)
    codes = _codes(n, k, seed + 1, device)
    g = torch.Generator().manual_seed(seed + 2)
    scale = (torch.rand(n, 1, generator=g) * 1e-2 + 1e-4) if per_row else torch.tensor(3e-3)
    scale = scale.to(device)
    bias = torch.randn(n, generator=g).to(dtype).to(device) if with_bias else None
    skip_unless_supported(impl, x, codes, scale)
    x_before = x.clone()

    y = impl.fn(x, codes, scale, bias)

    y_ref = int8_linear_ref(x, codes, scale, bias)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape == (t, n)
    assert torch.equal(x, x_before)
    _assert_within_epilogue_rounding(y, y_ref, _exact_epilogue(x, codes, scale, bias))


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_and_non_contiguous(impl, device, awkward, ties, skip_unless_supported):
    x = awkward((40, 48), dtype=torch.float32, seed=5, layout="strided", device=device, extreme=False)
    x3 = x.reshape(5, 8, 48)  # a view with strides (768, 96, 2)
    assert not x3.is_contiguous()
    codes = _codes(24, 48, 6, device).t().contiguous().t()
    scale = torch.rand(24, 1, generator=torch.Generator().manual_seed(7)).to(device) * 1e-2
    skip_unless_supported(impl, x3, codes, scale)
    y = impl.fn(x3, codes, scale, None)
    y_ref = int8_linear_ref(x3, codes, scale, None)
    assert y.shape == (5, 8, 24)
    _assert_within_epilogue_rounding(y, y_ref, _exact_epilogue(x3, codes, scale, None))


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_rows_give_bias_only(impl, device, skip_unless_supported):
    x = torch.zeros(4, 16, device=device)
    codes = _codes(8, 16, 1, device)
    scale = torch.full((8, 1), 0.5, device=device)
    bias = torch.arange(8, dtype=torch.float32, device=device)
    skip_unless_supported(impl, x, codes, scale)
    assert torch.equal(impl.fn(x, codes, scale, bias).cpu(), bias.cpu().expand(4, 8))


def _assert_within_epilogue_rounding(y, y_ref, exact):
    """Elementwise ``|y − y64| ≤ γ₄·(|acc·s_x·s_w| + |b|)`` for the reference and the impl alike.

    The int32 accumulator is exact (checked above), so the only error is the float32 epilogue:
    ``float(acc)`` (|acc| ≤ 1100·127·128 > 2²⁴ rounds), two scale products in either order, and the
    bias add: three roundings relative to ``|p| = |acc·s_x·s_w|`` and one relative to ``|p + b|``,
    together ≤ ``γ₄·(|p| + |b|)`` (u = 2⁻²⁴). FMA contraction only removes roundings. A wrong scale,
    a dropped bias or a mis-rounded activation code moves ``y`` by ≥ 2⁻⁷ relative: far outside.
    Plus 4 smallest subnormals for products that underflow.
    """
    y_exact, size = exact
    bound = gamma(4) * size + 4 * 2.0 ** -149
    for name, out in (("reference", y_ref), ("impl", y)):
        gap = (out.double().cpu() - y_exact).abs()
        worst = int((gap - bound).argmax())
        assert bool((gap <= bound).all()), (f"{name}: |y − y64| = {gap.flatten()[worst]:.3e} > γ₄·(|p|+|b|) = "
                                            f"{bound.flatten()[worst]:.3e} at flat index {worst} (u = {U32:.1e})")


@pytest.mark.parametrize("impl", IMPLS)
def test_epilogue_in_reference_order_is_bit_identical(impl, device, awkward, ties, skip_unless_supported):
    """Same float32 ops in the same order, FMA contraction off: not just close, identical."""
    x = _activations((17, 300), torch.float32, device, seed=3, awkward=awkward, ties=ties)
    codes = _codes(33, 300, 4, device)
    scale = torch.rand(33, 1, generator=torch.Generator().manual_seed(5)).to(device) * 1e-2
    bias = torch.randn(33, generator=torch.Generator().manual_seed(6)).to(device)
    skip_unless_supported(impl, x, codes, scale)
    assert torch.equal(impl.fn(x, codes, scale, bias).cpu(), int8_linear_ref(x, codes, scale, bias).cpu())


@pytest.mark.parametrize("impl", IMPLS)
def test_mismatched_shapes_are_refused_not_miscomputed(impl, device):
    x = torch.randn(3, 16, device=device)
    codes = torch.ones(4, 15, dtype=torch.int8, device=device)
    scale = torch.full((4, 1), 0.1, device=device)
    if impl.name == "torch":
        pytest.skip("the reference lets torch raise its own shape error")
    why = not_supported_reasons(impl, x, codes, scale)
    if impl.available():
        assert why == [impl.available()]
        return
    assert any("K=15" in r for r in why)
    if not any("supports" in r for r in why):  # the launcher itself also refuses a wrong-sized bias
        with pytest.raises(UnsupportedBackendError, match="bias must have N=4"):
            impl.fn(x, torch.ones(4, 16, dtype=torch.int8, device=device), scale, torch.zeros(3, device=device))


@pytest.mark.parametrize("n, k", [(64, 1), (1, 64), (1, 1), (3, 2)])
def test_reference_is_exact_on_degenerate_shapes(n, k):
    """A [1, N] transposed operand has strides (1, 1); torch._int_mm on CPU misread it (issue: 66576.98)."""
    from cq.kernels.reference import int8_linear_ref, quantize_activations_ref

    g = torch.Generator().manual_seed(n * 31 + k)
    x = torch.randn(8, k, generator=g)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=g) + 0.1
    qx, sx = quantize_activations_ref(x)
    exact = (qx.double() @ codes.double().t()) * sx.double() * scale.double().t()
    y = int8_linear_ref(x, codes, scale).double()
    # int32 accumulation is exact and float(acc) too (|acc| ≤ 64·128·127 < 2²⁴); the only error is the
    # two float32 rescalings: γ₂ = 2·2⁻²⁴(1 + 2⁻²³) relative, under 2⁻²² (no bias, so no absolute term)
    assert torch.allclose(y, exact, rtol=2 ** -22, atol=0)
