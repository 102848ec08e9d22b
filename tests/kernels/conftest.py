"""Fixtures for kernel parity tests: devices, awkward inputs, and skipping with an impl's own reasons."""

from __future__ import annotations

import pytest
import torch

from cq.kernels import not_supported_reasons

_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA, reason="no CUDA device")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def _skip_unless_supported(impl, *tensors) -> None:
    why = not_supported_reasons(impl, *tensors)
    if why:
        pytest.skip(f"{impl.op}/{impl.name}: {'; '.join(why)}")


@pytest.fixture
def skip_unless_supported():
    """``skip_unless_supported(impl, *tensors)`` skips the test with ``impl``'s own reasons when it cannot run."""
    return _skip_unless_supported


@pytest.fixture
def awkward():
    """``awkward(shape, dtype=, seed=, layout=, device=)``: see :func:`awkward_matrix`."""
    return awkward_matrix


@pytest.fixture
def ties():
    """``ties(w, step, seed=)``: see :func:`inject_ties`."""
    return inject_ties


def awkward_matrix(shape: tuple[int, int], *, dtype: torch.dtype, seed: int, layout: str = "contiguous",
                   device: str = "cpu", extreme: bool = True) -> torch.Tensor:
    """Gaussian data with a zero row, a sprinkling of 1000x outliers and (``extreme``) one value near
    the dtype's maximum.

    ``layout``: "contiguous", "strided" (every other column of a wider matrix) or "transposed".
    """
    n, k = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    if n > 1:
        w[1] = 0.0
    idx = torch.randint(0, n * k, (max(1, n * k // 50),), generator=g)
    w.view(-1)[idx] *= 1e3
    if extreme and n * k > 4:  # one value so large that w / scale overflows any sane scale (exercises clamp-first)
        w.view(-1)[-1] = -torch.finfo(dtype).max / 4
    w = w.to(dtype)
    if layout == "strided":
        wide = torch.zeros(n, 2 * k, dtype=dtype)
        wide[:, ::2] = w
        w = wide[:, ::2]
    elif layout == "transposed":
        w = w.t().contiguous().t()
    elif layout != "contiguous":
        raise ValueError(f"unknown layout {layout!r}")
    return w.to(device)


def inject_ties(w: torch.Tensor, step: torch.Tensor, *, seed: int, lo: int = -130, hi: int = 130) -> torch.Tensor:
    """Overwrite about a third of ``w`` with exact half-way points ``(m + 0.5) · step`` (step a power of two)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(lo, hi, w.shape, generator=g).to(torch.float64)
    ties = ((m + 0.5) * step.double().cpu()).to(w.dtype).to(w.device)
    pick = (torch.rand(w.shape, generator=g) < 1 / 3).to(w.device)
    out = w.clone()
    out[pick] = ties[pick]
    return out
