"""Parity of every registered ``quantize_int8`` implementation with the torch reference, bit for bit."""

from __future__ import annotations

import zlib

import pytest
import torch

from cq.kernels import implementations, quantize_int8_ref

IMPLS = [pytest.param(impl, id=impl.name) for impl in implementations("quantize_int8")]
SHAPES = [(1, 1), (3, 5), (17, 33), (64, 128), (130, 300)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _scale(w: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    w32 = w.float()
    if mode == "row":  # the production case: per-row absmax, zero rows floored
        return (w32.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-30)
    if mode == "tensor":
        return (w32.abs().amax() / 127).clamp(min=1e-30)
    if mode == "tight":  # 4x too small: most outliers clamp to ±127
        return (w32.abs().amax(dim=1, keepdim=True) / 508).clamp(min=1e-30)
    if mode == "full":  # an arbitrary positive [N, K] scale, read through its own strides
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(w.shape, generator=g) + 0.01).to(w.device)
    raise ValueError(mode)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["row", "tensor", "tight", "full"])
def test_matches_reference_bit_exact(impl, dtype, shape, mode, device, awkward, skip_unless_supported):
    seed = zlib.crc32(f"{shape}{mode}{dtype}".encode())
    w = awkward(shape, dtype=dtype, seed=seed, device=device)
    scale = _scale(w, mode, seed)
    skip_unless_supported(impl, w, scale)
    w_before = w.clone()

    q = impl.fn(w, scale)

    assert q.dtype == torch.int8 and q.shape == w.shape
    assert torch.equal(q.cpu(), quantize_int8_ref(w, scale).cpu())
    assert torch.equal(w, w_before), "the input must not be modified"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_inputs(impl, dtype, layout, device, awkward, skip_unless_supported):
    w = awkward((17, 33), dtype=dtype, seed=7, layout=layout, device=device)
    assert not w.is_contiguous()
    full = _scale(w, "full", 3).t().contiguous().t()  # a non-contiguous [N, K] scale too
    row = _scale(w, "row", 3)
    for scale in (full, row):
        skip_unless_supported(impl, w, scale)
        assert torch.equal(impl.fn(w, scale).cpu(), quantize_int8_ref(w, scale).cpu())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_ties_round_half_to_even(impl, dtype, device, awkward, ties, skip_unless_supported):
    w = awkward((40, 64), dtype=dtype, seed=11, device=device)
    # Power-of-two row scales make (m + 0.5) · scale an exact half-way point after the division.
    g = torch.Generator().manual_seed(12)
    step = 2.0 ** torch.randint(-12, 3, (40, 1), generator=g).to(torch.float32)
    w = ties(w, step, seed=13)
    scale = step.to(device)
    skip_unless_supported(impl, w, scale)
    q = impl.fn(w, scale)
    assert torch.equal(q.cpu(), quantize_int8_ref(w, scale).cpu())
    # Spelled out, independent of the reference: half-way values go to the even neighbour.
    x = (w.double().cpu() / step.double())
    is_tie = (x - x.floor() == 0.5) & (x.abs() < 127)
    assert is_tie.sum() > 100
    assert (q.cpu()[is_tie].long() % 2 == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_known_values(impl, device, skip_unless_supported):
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -127.5, 3e38],
                      [1e-45, -1e-45, 0.0, -0.0, 4194303.5, -4194304.5, 8388609.0, 1.0, -1.0, -3e38]],
                     device=device)
    scale = torch.tensor([[1.0], [1.0]], device=device)
    skip_unless_supported(impl, w, scale)
    assert impl.fn(w, scale).cpu().tolist() == [
        [0, 2, 2, 0, -2, -2, 126, 127, -127, 127],
        [0, 0, 0, 0, 127, -127, 127, 1, -1, -127],
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 5), (4, 0)])
def test_empty(impl, shape, device, skip_unless_supported):
    w = torch.zeros(shape, device=device)
    scale = torch.tensor(1.0, device=device)
    skip_unless_supported(impl, w, scale)
    q = impl.fn(w, scale)
    assert q.shape == shape and q.dtype == torch.int8
