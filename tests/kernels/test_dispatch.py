"""Backend selection for the kernel ops: AUTO's choices, explicit requests, and the errors that explain."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import cq.kernels as kernels
from cq.errors import ConfigError, UnsupportedBackendError
from cq.kernels import Backend, KernelImpl, _registry, implementations, int8_linear, quantize_int8, select
from cq.kernels import triton_kernels as tk

OPS = ["quantize_int8", "int8_linear"]
needs_interpreter = pytest.mark.skipif(not tk.INTERPRET or tk.triton_unavailable_reason() is not None,
                                       reason="needs triton under TRITON_INTERPRET=1")


@pytest.fixture
def private_registry(monkeypatch):
    """A copy of the registry for this test only; the real one is restored afterwards."""
    monkeypatch.setattr(_registry, "_REGISTRY", {op: list(impls) for op, impls in _registry._REGISTRY.items()})
    return _registry._REGISTRY


def _args(op, device="cpu"):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    if op == "quantize_int8":
        return (w.to(device), (w.abs().amax(1, keepdim=True) / 127).to(device))
    codes = torch.randint(-127, 128, (4, 16), generator=g, dtype=torch.int8)
    return (w.to(device), codes.to(device), torch.full((4, 1), 0.01).to(device))


@pytest.mark.parametrize("op", OPS)
def test_both_backends_are_registered(op):
    assert {"torch", "triton"} <= {impl.name for impl in implementations(op)}


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_picks_torch(op):
    assert select(op, Backend.AUTO, _args(op)).name == "torch"
    assert select(op, "auto", _args(op)).name == "torch"


@needs_interpreter
@pytest.mark.parametrize("op", OPS)
def test_interpreter_ranks_below_torch_so_auto_never_picks_it(op):
    by_name = {impl.name: impl for impl in implementations(op)}
    assert "cpu" in by_name["triton"].devices
    assert by_name["triton"].priority < by_name["torch"].priority


@needs_interpreter
def test_explicit_triton_runs_on_cpu_under_the_interpreter():
    w, s = _args("quantize_int8")
    assert select("quantize_int8", "triton", (w, s)).name == "triton"
    assert torch.equal(quantize_int8(w, s, backend="triton"), quantize_int8(w, s, backend="torch"))
    x, codes, sw = _args("int8_linear")
    assert torch.equal(int8_linear(x, codes, sw, backend=Backend.TRITON), int8_linear(x, codes, sw, backend="torch"))


def test_explicit_backend_that_cannot_run_lists_its_reason():
    w = torch.randn(2, 3, 4)  # 3-D: the Triton kernel takes [N, K] only (and without triton: "not installed")
    with pytest.raises(UnsupportedBackendError) as err:
        quantize_int8(w, torch.tensor(0.1), backend="triton")
    why = err.value.reasons["triton"]
    assert why and all(isinstance(r, str) and r for r in why)
    assert all(r in str(err.value) for r in why)
    unavailable = tk.triton_unavailable_reason()
    assert why == [unavailable] if unavailable else any("2-D" in r and "(2, 3, 4)" in r for r in why)


def test_explicit_triton_without_cuda_or_interpreter_says_so(monkeypatch):
    monkeypatch.setattr(tk, "_IMPORT_ERROR", None)
    monkeypatch.setattr(tk, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnsupportedBackendError, match="no CUDA device and TRITON_INTERPRET is not set"):
        quantize_int8(*_args("quantize_int8"), backend="triton")
    assert select("quantize_int8", "auto", _args("quantize_int8")).name == "torch"


def test_explicit_triton_when_triton_is_missing_says_so(monkeypatch):
    monkeypatch.setattr(tk, "_IMPORT_ERROR", "triton is not installed (pip install 'triton==3.7.1' on Linux)")
    with pytest.raises(UnsupportedBackendError, match="triton is not installed"):
        int8_linear(*_args("int8_linear"), backend="triton")
    assert select("int8_linear", "auto", _args("int8_linear")).name == "torch"


def test_module_imports_and_registers_without_triton(monkeypatch, private_registry):
    # `import triton` raises ImportError when sys.modules holds None for it.
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)
    spec = importlib.util.spec_from_file_location("cq.kernels._triton_kernels_probe", tk.__file__)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)  # must not raise

    assert probe.triton_unavailable_reason().startswith("triton is not installed")
    for op in OPS:
        impl = next(i for i in private_registry[op] if i.name == "triton")
        assert impl.available() == probe.triton_unavailable_reason()
        assert select(op, "auto", _args(op)).name == "torch"
        with pytest.raises(UnsupportedBackendError, match="triton is not installed"):
            select(op, "triton", _args(op))


@pytest.mark.parametrize("backend", ["cuda", "TORCH", "", "reference"])
def test_unknown_backend_string_lists_valid_ones(backend):
    with pytest.raises(ConfigError) as err:
        quantize_int8(*_args("quantize_int8"), backend=backend)
    for valid in ("auto", "torch", "triton"):
        assert repr(valid) in str(err.value)


def test_auto_with_every_impl_rejected_lists_each_candidate_and_reason(private_registry):
    op = "cq_test_fake_op"
    kernels.register(KernelImpl(op=op, name="torch", fn=lambda x: x, priority=0,
                                check=lambda *t: ["refuses odd sizes, got 3"]))
    kernels.register(KernelImpl(op=op, name="triton", fn=lambda x: x, priority=5,
                                available=lambda: "no accelerator in this test"))
    kernels.register(KernelImpl(op=op, name="cuda_only", fn=lambda x: x, devices=("cuda",), priority=1))
    with pytest.raises(UnsupportedBackendError) as err:
        select(op, "auto", (torch.zeros(3),))
    message = str(err.value)
    assert err.value.reasons == {
        "triton": ["no accelerator in this test"],
        "cuda_only": ["tensors on ['cpu'], supports ['cuda']"],
        "torch": ["refuses odd sizes, got 3"],
    }
    for name, why in err.value.reasons.items():
        assert f"{name}: {why[0]}" in message


def test_fake_op_is_gone_after_the_test():
    with pytest.raises(ConfigError, match="unknown kernel op"):
        implementations("cq_test_fake_op")


def test_auto_prefers_compiled_triton_on_cuda_tensors_by_priority():
    # Checked as data so it holds on CPU-only machines: compiled Triton outranks torch, interpreted ranks below.
    by_name = {impl.name: impl for impl in implementations("int8_linear")}
    if tk.INTERPRET:
        assert by_name["triton"].priority < by_name["torch"].priority
    else:
        assert by_name["triton"].priority > by_name["torch"].priority
        assert by_name["triton"].devices == ("cuda",)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or tk.INTERPRET, reason="needs CUDA without TRITON_INTERPRET")
@pytest.mark.parametrize("op", OPS)
def test_auto_on_cuda_picks_triton(op):
    assert select(op, "auto", _args(op, "cuda")).name == "triton"
