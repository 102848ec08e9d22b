"""Triton kernels for ``quantize_int8`` and ``int8_linear``, registered behind the backend dispatch.

They match :mod:`cq.kernels.reference` exactly: int8 codes and quantized activations bit for bit, int32
accumulators exactly, and the float32 epilogue in the reference's operation order.

Which device they run on is fixed when this module is imported, because ``@triton.jit`` reads
``TRITON_INTERPRET`` at decoration time:

- compiled (CUDA): registered for ``cuda`` tensors with a priority above the torch reference, so
  ``backend="auto"`` picks them on GPU;
- interpreter (``TRITON_INTERPRET=1``, the CPU test mode): registered for ``cpu`` and ``cuda`` tensors
  with a priority *below* the torch reference, so ``backend="auto"`` never picks the slow interpreter
  while ``backend="triton"`` still runs it (parity tests);
- triton missing or broken: still registered, with ``available()`` saying why, so an explicit request
  fails with that reason instead of an import error.

Load-bearing details (easy to "simplify" wrongly):

- division is ``tl.math.div_rn`` (IEEE round-to-nearest); Triton's ``/`` on fp32 lowers to the
  approximate ``div.full.f32`` on NVIDIA GPUs (up to 2 ulp off), which moves ties;
- rounding is half-to-even by the magic-number trick ``(x + 1.5·2**23) - 1.5·2**23``, exact only for
  ``|x| < 2**22``, so values are clamped to the code range *first* (harmless: the bounds are integers,
  so clamp and round commute); libdevice ``rint`` does not exist in the interpreter;
- inputs are upcast to float32 inside the kernel (exact for fp16/bf16), never rounded to bf16;
- the int8 dot always passes ``out_dtype=tl.int32`` (Triton 3.7 rejects an int32 accumulator without it);
- the epilogue is ``(acc · s_x) · s_w + b`` like the reference, launched with fp-fusion off so that the
  GPU does not contract it into an FMA.

Example (the CPU tensors below run the Triton kernel under the interpreter, the reference otherwise):
    >>> import torch
    >>> from cq.kernels import quantize_int8
    >>> from cq.kernels.triton_kernels import INTERPRET
    >>> backend = "triton" if INTERPRET else "auto"
    >>> w = torch.tensor([[0.5, 1.5, 2.5, -2.5, 300.0]])
    >>> quantize_int8(w, torch.tensor(1.0), backend=backend).tolist()
    [[0, 2, 2, -2, 127]]
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import UnsupportedBackendError
from ._registry import KernelImpl, register

__all__ = [
    "INTERPRET",
    "triton_unavailable_reason",
    "quantize_int8_triton",
    "quantize_activations_triton",
    "int8_matmul_triton",
    "int8_linear_triton",
]

try:
    import triton
    import triton.language as tl
except Exception as exc:  # noqa: BLE001 - a broken triton install must not break `import cq`
    triton = None
    tl = None
    _IMPORT_ERROR: str | None = (
        "triton is not installed (pip install 'triton==3.7.1' on Linux)"
        if isinstance(exc, ImportError)
        else f"triton failed to import: {exc!r}"
    )
else:
    _IMPORT_ERROR = None


def _interpret_mode() -> bool:
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # the same flag @triton.jit consults at decoration time
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


#: True when the kernels below were decorated in Triton's CPU interpreter mode.
INTERPRET: bool = _interpret_mode()

_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run on this machine, or ``None`` when they can.

    Example:
        >>> reason = triton_unavailable_reason()
        >>> reason is None or isinstance(reason, str)
        True
    """
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return (
            "no CUDA device and TRITON_INTERPRET is not set (to run the Triton kernels on CPU in the slow "
            "interpreter, set TRITON_INTERPRET=1 before importing cq)"
        )
    return None


def _require(op: str, *tensors: torch.Tensor) -> None:
    why = triton_unavailable_reason()
    if not why:
        bad = sorted({t.device.type for t in tensors} - set(_triton_devices()))
        why = f"tensors on {bad}, supports {list(_triton_devices())}" if bad else None
    if why:
        raise UnsupportedBackendError(op, {"triton": [why]})


def _quiet_fp():
    # The interpreter evaluates kernels with numpy, which warns on fp overflow (e.g. w / scale = inf,
    # which the kernel then clamps on purpose, as the reference does); compiled kernels never warn.
    if INTERPRET:
        import numpy as np

        return np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore")
    return contextlib.nullcontext()


def _same_device(*tensors: torch.Tensor) -> list[str]:
    devices = sorted({str(t.device) for t in tensors})
    return [] if len(devices) <= 1 else [f"tensors are on different devices {devices}; move them to one device"]


# ---------------------------------------------------------------------------------------------------
# Kernels (defined only when triton imported)
# ---------------------------------------------------------------------------------------------------

if triton is not None:
    # Interpreter programs cost ~1-3 ms each regardless of size (environment.md §2), so use few, big
    # blocks there; on GPU use blocks sized for occupancy.
    if INTERPRET:
        _QUANT_BLOCKS = dict(BLOCK_N=64, BLOCK_K=256)
        _ACT_BLOCKS = dict(BLOCK_T=64, BLOCK_K=512)
        # Multi-config autotune benchmarks through the (absent) driver and fails in the interpreter.
        _MATMUL_CONFIGS = [triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8))]
    else:
        _QUANT_BLOCKS = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4)
        _ACT_BLOCKS = dict(BLOCK_T=4, BLOCK_K=1024, num_warps=4)
        # Few configs on purpose: every new (N, K) compiles and times each of them once.
        _MATMUL_CONFIGS = [
            triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8), num_warps=8, num_stages=3),
            triton.Config(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8), num_warps=4, num_stages=4),
            triton.Config(dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8), num_warps=4, num_stages=4),
        ]

    @triton.jit
    def _round_half_even(x):
        # 1.5 * 2**23: adding it pushes the fraction bits out of the fp32 mantissa under the default
        # round-to-nearest-even mode; subtracting it restores the now-integral value. |x| < 2**22 only.
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _quantize_int8_kernel(w_ptr, s_ptr, out_ptr, N, K,
                              stride_wn, stride_wk, stride_sn, stride_sk, stride_on,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0.0)
        s = tl.load(s_ptr + rn[:, None] * stride_sn + rk[None, :] * stride_sk, mask=mask, other=1.0)
        x = tl.math.div_rn(w.to(tl.float32), s)
        q = _round_half_even(tl.minimum(tl.maximum(x, -127.0), 127.0))
        tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], q.to(tl.int8), mask=mask)

    @triton.jit
    def _quantize_activations_kernel(x_ptr, q_ptr, s_ptr, T, K, stride_xt, stride_xk, stride_qt,
                                     BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        rt = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        row_ok = rt < T
        amax = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask = row_ok[:, None] & (rk[None, :] < K)
            x = tl.load(x_ptr + rt[:, None] * stride_xt + rk[None, :] * stride_xk, mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        # Same two roundings as the reference: absmax / 127 in fp32, then the floor.
        s = tl.maximum(tl.math.div_rn(amax, tl.full((BLOCK_T,), 127.0, tl.float32)), 1e-30)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask = row_ok[:, None] & (rk[None, :] < K)
            x = tl.load(x_ptr + rt[:, None] * stride_xt + rk[None, :] * stride_xk, mask=mask, other=0.0)
            y = tl.math.div_rn(x.to(tl.float32), s[:, None])
            q = _round_half_even(tl.minimum(tl.maximum(y, -128.0), 127.0))
            tl.store(q_ptr + rt[:, None] * stride_qt + rk[None, :], q.to(tl.int8), mask=mask)
        tl.store(s_ptr + rt, s, mask=row_ok)

    # Not keyed on M (tokens): it changes on every call at inference and would re-tune each time.
    @triton.autotune(configs=_MATMUL_CONFIGS, key=["N", "K", "APPLY_SCALES"])
    @triton.jit
    def _int8_matmul_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K,
                            stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_sb,
                            APPLY_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
        # C[M, N] = A[M, K] · B[N, K]ᵀ with B read through its strides (no transpose copy).
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # Grouped ordering: consecutive programs share B tiles in L2.
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
            b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=(rk[:, None] < K) & (rn[None, :] < N), other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
        c_mask = (rm[:, None] < M) & (rn[None, :] < N)
        if APPLY_SCALES:
            sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
            sb = tl.load(sb_ptr + rn * stride_sb, mask=rn < N, other=0.0)
            y = (acc.to(tl.float32) * sa[:, None]) * sb[None, :]
            if HAS_BIAS:
                y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
            tl.store(c_ptrs, y, mask=c_mask)
        else:
            tl.store(c_ptrs, acc, mask=c_mask)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------

def quantize_int8_triton(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(round_half_even(w / scale), -127, 127)`` as int8, bit-exact with :func:`quantize_int8_ref`.

    ``w`` is ``[N, K]`` float32/float16/bfloat16 (any strides); ``scale`` broadcasts to ``w``:
    ``()``, ``[N, 1]``, ``[1, K]`` or ``[N, K]``.

    Example:
        >>> import torch
        >>> if INTERPRET:  # CPU tensors need the interpreter
        ...     print(quantize_int8_triton(torch.tensor([[1.0, -0.5], [3.0, 500.0]]),
        ...                                torch.tensor([[0.5], [2.0]])).tolist())
        ... else:
        ...     print([[2, -1], [2, 127]])
        [[2, -1], [2, 127]]
    """
    _require("quantize_int8", w, scale)
    reasons = _quantize_int8_reasons(w, scale)
    if reasons:
        raise UnsupportedBackendError("quantize_int8", {"triton": reasons})
    n, k = w.shape
    out = torch.empty((n, k), dtype=torch.int8, device=w.device)
    if out.numel() == 0:
        return out
    # The reference rounds the scale to float32 first; broadcast_to is a stride-0 view, no copy.
    s = torch.broadcast_to(scale.to(torch.float32), (n, k))
    blocks = _QUANT_BLOCKS
    grid = (triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(k, blocks["BLOCK_K"]))
    with _quiet_fp():
        _quantize_int8_kernel[grid](w, s, out, n, k, w.stride(0), w.stride(1), s.stride(0), s.stride(1),
                                    out.stride(0), **blocks)
    return out


def quantize_activations_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8 quantization of ``x`` ``[T, K]``; bit-exact with :func:`quantize_activations_ref`.

    Returns ``(q, s)``: int8 ``[T, K]`` codes in [-128, 127] and float32 ``[T, 1]`` scales
    ``max(absmax / 127, 1e-30)``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[127.0, -63.5, 0.5], [0.0, 0.0, 0.0]])
        >>> if INTERPRET:
        ...     q, s = quantize_activations_triton(x)
        ...     print(q.tolist(), s.flatten().tolist())
        ... else:
        ...     print([[127, -64, 0], [0, 0, 0]], [1.0, 1.0000000031710769e-30])
        [[127, -64, 0], [0, 0, 0]] [1.0, 1.0000000031710769e-30]
    """
    _require("int8_linear", x)
    if x.ndim != 2 or x.dtype not in _FLOAT_INPUTS:
        raise UnsupportedBackendError(
            "int8_linear", {"triton": [f"x must be a 2-D float32/float16/bfloat16 tensor, got {x.dtype} {tuple(x.shape)}"]}
        )
    t, k = x.shape
    q = torch.empty((t, k), dtype=torch.int8, device=x.device)
    s = torch.empty((t, 1), dtype=torch.float32, device=x.device)
    if t == 0 or k == 0:
        return q, s.fill_(1e-30)
    blocks = _ACT_BLOCKS
    with _quiet_fp():
        _quantize_activations_kernel[(triton.cdiv(t, blocks["BLOCK_T"]),)](
            x, q, s, t, k, x.stride(0), x.stride(1), q.stride(0), **blocks)
    return q, s


def int8_matmul_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a`` ``[M, K]`` and ``b`` ``[N, K]`` with int32 accumulation.

    Example:
        >>> import torch
        >>> a = torch.tensor([[-128, 127]], dtype=torch.int8)
        >>> b = torch.tensor([[-127, -127]], dtype=torch.int8)
        >>> if INTERPRET:
        ...     print(int8_matmul_triton(a, b).tolist())
        ... else:
        ...     print([[127]])
        [[127]]
    """
    _require("int8_linear", a, b)
    if a.ndim != 2 or b.ndim != 2 or a.dtype != torch.int8 or b.dtype != torch.int8 or a.shape[1] != b.shape[1]:
        raise UnsupportedBackendError(
            "int8_linear",
            {"triton": [f"need int8 a [M, K] and b [N, K], got {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}"]},
        )
    m, k = a.shape
    n = b.shape[0]
    c = torch.zeros((m, n), dtype=torch.int32, device=a.device)
    if c.numel() == 0 or k == 0:
        return c
    _launch_matmul(a, b, c, c, c, c, stride_sb=0, apply_scales=False, has_bias=False)
    return c


def int8_linear_triton(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """ComfyUI's dynamic per-token W8A8 linear in Triton; same contract as :func:`int8_linear_ref`.

    ``x`` ``[..., K]`` float; ``codes`` int8 ``[N, K]``; ``scale`` ``()`` or ``[N, 1]``; ``bias``
    ``[N]`` or ``None``. Returns float32 ``[..., N]``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[127.0, -127.0]])
        >>> codes = torch.tensor([[1, 1], [127, -127]], dtype=torch.int8)
        >>> if INTERPRET:
        ...     print(int8_linear_triton(x, codes, torch.tensor(0.5), torch.tensor([1.0, 0.0])).tolist())
        ... else:
        ...     print([[1.0, 16129.0]])
        [[1.0, 16129.0]]
    """
    tensors = (x, codes, scale) if bias is None else (x, codes, scale, bias)
    _require("int8_linear", *tensors)
    reasons = _int8_linear_reasons(x, codes, scale)
    if bias is not None and bias.device != x.device:
        reasons.append(f"bias is on {bias.device} but x on {x.device}; move them to one device")
    if bias is not None and bias.numel() != codes.shape[0]:
        reasons.append(f"bias must have N={codes.shape[0]} elements, got shape {tuple(bias.shape)}")
    if reasons:
        raise UnsupportedBackendError("int8_linear", {"triton": reasons})
    lead = x.shape[:-1]
    k = x.shape[-1]
    n = codes.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y.reshape(*lead, n)
    qx, sx = quantize_activations_triton(x2)
    sw = scale.to(torch.float32).reshape(-1)
    stride_sb = 0 if sw.numel() == 1 else sw.stride(0)
    b = bias.to(torch.float32).reshape(-1) if bias is not None else sw  # unread when there is no bias
    _launch_matmul(qx, codes, y, sx, sw, b.contiguous(), stride_sb=stride_sb, apply_scales=True,
                   has_bias=bias is not None)
    return y.reshape(*lead, n)


def _launch_matmul(a, b, c, sa, sb, bias, *, stride_sb, apply_scales, has_bias):
    m, k = a.shape
    n = b.shape[0]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    with _quiet_fp():
        _int8_matmul_kernel[grid](a, b, c, sa, sb, bias, m, n, k, a.stride(0), a.stride(1), b.stride(0),
                                  b.stride(1), c.stride(0), stride_sb, APPLY_SCALES=apply_scales,
                                  HAS_BIAS=has_bias, enable_fp_fusion=False)


# ---------------------------------------------------------------------------------------------------
# Capability checks and registration
# ---------------------------------------------------------------------------------------------------

def _quantize_int8_reasons(w: torch.Tensor, scale: torch.Tensor, *_) -> list[str]:
    reasons = _same_device(w, scale)
    if w.ndim != 2:
        reasons.append(f"w must be 2-D [N, K], got shape {tuple(w.shape)}; reshape it or use backend='torch'")
        return reasons
    if w.dtype not in _FLOAT_INPUTS:
        reasons.append(f"w dtype {w.dtype} not supported, use float32/float16/bfloat16")
    if not scale.is_floating_point():
        reasons.append(f"scale must be floating point, got {scale.dtype}")
    try:
        ok = torch.broadcast_shapes(scale.shape, w.shape) == w.shape
    except RuntimeError:
        ok = False
    if not ok:
        reasons.append(f"scale of shape {tuple(scale.shape)} does not broadcast to w {tuple(w.shape)}; "
                       "use (), [N, 1], [1, K] or [N, K]")
    return reasons


def _int8_linear_reasons(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, *_) -> list[str]:
    reasons = _same_device(x, codes, scale)
    if x.dtype not in _FLOAT_INPUTS:
        reasons.append(f"x dtype {x.dtype} not supported, use float32/float16/bfloat16")
    if codes.dtype != torch.int8 or codes.ndim != 2:
        reasons.append(f"codes must be int8 [N, K], got {codes.dtype} {tuple(codes.shape)}")
        return reasons
    if x.ndim < 1 or x.shape[-1] != codes.shape[1]:
        reasons.append(f"x {tuple(x.shape)} does not end in K={codes.shape[1]} of codes {tuple(codes.shape)}")
    elif x.shape[-1] == 0:
        reasons.append("K = 0: nothing to reduce over")
    if scale.numel() not in (1, codes.shape[0]):
        reasons.append(f"scale must be () or [N, 1] with N={codes.shape[0]}, got {tuple(scale.shape)}")
    return reasons


def _triton_devices() -> tuple[str, ...]:
    # The interpreter copies tensors to the host itself, so it takes CPU and CUDA tensors alike.
    return ("cpu", "cuda") if INTERPRET else ("cuda",)


#: Above the torch reference (0) when compiled, so AUTO prefers Triton on CUDA; below it in the
#: interpreter, so AUTO never picks the interpreter while an explicit ``backend="triton"`` still can.
PRIORITY = -10 if INTERPRET else 10

register(KernelImpl(op="quantize_int8", name="triton", fn=quantize_int8_triton, devices=_triton_devices(),
                    priority=PRIORITY, available=triton_unavailable_reason, check=_quantize_int8_reasons))
register(KernelImpl(op="int8_linear", name="triton", fn=int8_linear_triton, devices=_triton_devices(),
                    priority=PRIORITY, available=triton_unavailable_reason, check=_int8_linear_reasons))
