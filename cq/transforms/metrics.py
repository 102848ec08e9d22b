"""Quality metrics: weight MSE/SQNR, output error for a Hessian or inputs, and ComfyUI's W8A8 error.

Products and norms run in float32 (cascaded reductions): the metrics add errors around 1e-6
relative, far below any quantization error they report (tests compare them with float64 oracles).
"""

from __future__ import annotations

import collections
import math
import threading

import attrs
import torch

from ..kernels import Backend, int8_linear, select
from ..kernels.reference import _int_mm
from ..kernels.rows import sqnr_from_sums
from ..state import LayerState, PerRow, PerTensor, record
from .hessian import one_thread
from .rounding import reconstruct, working_dequantized

__all__ = ["weight_metrics", "mse", "sqnr_db", "max_error", "rel_output_error", "w8a8_output_error", "MetricsConfig", "measure",
           "db"]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def mse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Mean squared error ``mean((w - w_hat)²)``."""
    return float(((_f64(w) - _f64(w_hat)) ** 2).mean()) if w.numel() else 0.0


def max_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((_f64(w) - _f64(w_hat)).abs().max()) if w.numel() else 0.0


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σw² / Σ(w-ŵ)²)`` in dB (``inf`` when exact).

    Example:
        >>> round(sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.05])), 2)
        40.0
    """
    return sqnr_from_sums(float((_f64(w) ** 2).sum()), float(((_f64(w) - _f64(w_hat)) ** 2).sum()))


def _sq(t: torch.Tensor) -> float:
    """``Σ t²`` via ``vector_norm`` (a blocked, cascaded reduction: ~1e-7 relative in float32 and
    20x faster here than a float64-accumulated sum, which would dominate a conversion's run time)."""
    return float(torch.linalg.vector_norm(t)) ** 2


def _error32(w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    # Quantized weights are within a few percent of the target, so the float32 difference is exact
    # (Sterbenz) for almost every element; float64 copies of whole weights would dominate run time.
    if w.dtype == torch.float64 or w_hat.dtype == torch.float64:
        return _f64(w) - _f64(w_hat)
    return w.detach().to(torch.float32) - w_hat.detach().to(torch.float32)


def weight_metrics(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    """``mse``, ``sqnr_db`` and ``max_error`` in one pass (what :func:`measure` records).

    Example:
        >>> m = weight_metrics(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.05]))
        >>> round(m["sqnr_db"], 2), round(m["max_error"], 4)
        (40.0, 0.05)
    """
    if not w.numel():
        return {"mse": 0.0, "sqnr_db": math.inf, "max_error": 0.0}
    return _weight_metrics(w, _error32(w, w_hat))


def _weight_metrics(w: torch.Tensor, e: torch.Tensor) -> dict[str, float]:
    noise = _sq(e)
    sq = sqnr_from_sums(_sq(w.detach().to(e.dtype)), noise)
    lo, hi = torch.aminmax(e)
    return {"mse": noise / w.numel(), "sqnr_db": sq, "max_error": max(-float(lo), float(hi))}


def db(rel: float) -> float:
    """An amplitude ratio in dB (``-20·log10(rel)``): 0.01 → 40 dB."""
    return math.inf if rel == 0 else -20.0 * math.log10(rel)


def rel_output_error(w: torch.Tensor, w_hat: torch.Tensor, *, hessian: torch.Tensor | None = None,
                     x: torch.Tensor | None = None) -> float:
    """Relative output error ``‖(W−Ŵ)Xᵀ‖_F / ‖WXᵀ‖_F``.

    With a Hessian ``H ∝ XᵀX`` it is computed exactly as ``√(tr(EHEᵀ) / tr(WHWᵀ))``; with inputs
    ``x`` [T, K] directly. Exactly one of the two must be given.
    """
    if (hessian is None) == (x is None):
        raise ValueError("rel_output_error needs exactly one of hessian= or x=")
    e = _error32(w, w_hat)
    wf = w.detach().to(e.dtype)
    if hessian is not None:
        h = hessian.detach().to(e.dtype)
        num = float(((e @ h) * e).sum(dtype=torch.float64))
        den = float(((wf @ h) * wf).sum(dtype=torch.float64))
    else:
        xx = x.detach().reshape(-1, x.shape[-1]).to(e.dtype)
        num = _sq(xx @ e.t())
        den = _sq(xx @ wf.t())
    if den <= 0.0:
        return 0.0 if num <= 0.0 else math.inf
    return math.sqrt(max(num, 0.0) / den)


def w8a8_output_error(state: LayerState, x: torch.Tensor, *, backend: Backend | str = Backend.AUTO) -> float:
    """Relative error of ComfyUI's int8 forward against the float layer on inputs ``x`` [T, K].

    The runtime rotates ``x`` (convrot), quantizes it per token, multiplies by the int8 codes and
    rescales; the reference is ``x · originalᵀ``. Bias is left out of both.
    """
    if state.codes is None or not isinstance(state.granularity, (PerTensor, PerRow)):
        raise ValueError(f"{state.name}: W8A8 error needs int8 codes with tensor or row scales")
    if state.basis is not None and not state.basis.native:
        raise ValueError(f"{state.name}: a layer in basis {type(state.basis).__name__} has no ComfyUI W8A8 forward "
                         "(e.g. QuIP's output side is rotated too); measure it with rel_output_error on "
                         "reconstruct(state)")
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
    ref = x2 @ (state.original if state.original is not None else state.weight).detach().to(torch.float32).t()
    return _w8a8(state, x2, ref, backend)


def _w8a8(state: LayerState, x2: torch.Tensor, ref: torch.Tensor, backend) -> float:
    # A native basis (ConvRot) rotates activations exactly as the runtime does (dense per-group
    # matmul), so the activation codes, and the figure reported, are the runtime's.
    xr = state.basis.activations(x2) if state.basis is not None else x2
    y = int8_linear(xr, state.codes, state.scale, None, backend=backend)
    den = math.sqrt(_sq(ref))
    num = math.sqrt(_sq(y - ref))
    return 0.0 if den == 0.0 and num == 0.0 else (num / den if den else math.inf)


@attrs.frozen(eq=False)
class MetricsConfig:
    """What :func:`measure` computes.

    ``x``: input rows [T, K] for output and W8A8 errors (none: only the Hessian-based output error,
    when the state has a Hessian, and weight-space metrics). ``sample_rows``: for an unrotated
    row-scaled layer with more than ``4 · sample_rows`` output rows whose per-row sums are known
    (``meta["row_sums"]`` from :func:`~cq.transforms.fused.fused_rtn`), estimate the output and W8A8
    errors on ``sample_rows`` rows drawn with probability ∝ a mix of ``‖w_r‖²`` and ``‖w_r − ŵ_r‖²``
    (importance sampling: unbiased sums, ±3 % on 4096-row layers at 512 rows, where uniform row
    sampling missed layers whose error sits in a few rows); weight metrics stay exact.
    ``metrics["output_rows"]`` records the sample size. ``None``: every row.
    """

    x: torch.Tensor | None = attrs.field(default=None, repr=lambda t: "None" if t is None else f"Tensor{tuple(t.shape)}")
    backend: Backend = attrs.field(default=Backend.AUTO, converter=Backend)
    sample_rows: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))


#: Rows per block in :func:`_rowwise_metrics`: keeps the error block in cache (a whole-weight
#: reconstruction plus error doubled measure()'s time on 4096² layers).
_ROWS = 512


def _rowwise_ok(state: LayerState, original: torch.Tensor) -> bool:
    return (state.codes is not None and state.basis is None
            and isinstance(state.granularity, (PerTensor, PerRow)) and original.dtype != torch.float64)


def _rowwise_metrics(state: LayerState, original: torch.Tensor, x2: torch.Tensor | None):
    """Weight and input-output metrics of an unrotated row/tensor-scaled state, a row block at a time.

    Returns the metrics and ``x · originalᵀ`` (reused for the W8A8 error).
    """
    n = original.shape[0]
    per_row = isinstance(state.granularity, PerRow)
    noise = signal = out_noise = out_signal = 0.0
    worst = 0.0
    refs = []
    for i in range(0, n, _ROWS):
        w = original[i:i + _ROWS].detach().to(torch.float32)
        s = state.scale[i:i + _ROWS] if per_row else state.scale
        e = w - state.codes[i:i + _ROWS].to(torch.float32) * s.to(torch.float32)
        noise += _sq(e)
        signal += _sq(w)
        lo, hi = torch.aminmax(e)
        worst = max(worst, -float(lo), float(hi))
        if x2 is not None:
            ref = x2 @ w.t()
            refs.append(ref)
            out_noise += _sq(x2 @ e.t())
            out_signal += _sq(ref)
    sq = math.inf if noise == 0 else (-math.inf if signal == 0 else 10.0 * math.log10(signal / noise))
    m = {"mse": noise / original.numel(), "sqnr_db": sq, "max_error": worst}
    if x2 is None:
        return m, None
    m["rel_out_x"] = math.sqrt(out_noise / out_signal) if out_signal > 0 else 0.0
    return m, torch.cat(refs, dim=1)


_WEIGHT_KEYS = ("mse", "sqnr_db", "max_error")


#: Sampled rows per product in :func:`_sampled_output_metrics`: bounds its scratch buffers
#: (~1.4 KiB per input column) and keeps each product a single GEMM of [T, K] by [K, 2·rows].
_SAMPLE_CHUNK = 128


class _Scratch(threading.local):
    """Per-thread buffers the sampled report reuses from layer to layer.

    Why: a fresh CPU buffer faults in page by page on first touch, ~4-30 µs per 4 KiB page measured
    on the shared VM; the report's [512, K] temporaries cost more in faults than in arithmetic (a
    4096² layer: ~60 ms of faults, ~4 ms of products). Keyed by shape, so the set is bounded by the
    model's distinct widths; a few MiB per width.
    """

    def __init__(self):
        self.bufs: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, shape, dtype, str(device))
        buf = self.bufs.pop(key, None)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, device=device)
        self.bufs[key] = buf
        while len(self.bufs) > 24:  # several widths × several buffers; older ones go
            self.bufs.popitem(last=False)
        return buf


_SCRATCH = _Scratch()
_TOKEN_CODES: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_TOKEN_LOCK = threading.Lock()


def _token_codes(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_activations_ref(x2)``, computed once per input tensor (the runner's report reuses
    one set of Gaussian rows for every layer of a width). The key holds ``x2`` itself, so its
    storage (and data pointer) stays alive while cached; the version counter catches in-place edits."""
    from ..kernels.reference import quantize_activations_ref

    key = (x2.data_ptr(), tuple(x2.shape), x2.stride(), x2.dtype, str(x2.device), x2._version)
    with _TOKEN_LOCK:
        hit = _TOKEN_CODES.get(key)
        if hit is not None:
            _TOKEN_CODES.move_to_end(key)
            return hit[1], hit[2]
    qx, sx = quantize_activations_ref(x2)
    with _TOKEN_LOCK:
        _TOKEN_CODES[key] = (x2, qx, sx)
        while len(_TOKEN_CODES) > 8:
            _TOKEN_CODES.popitem(last=False)
    return qx, sx


def _importance_sample(state: LayerState, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` row indices drawn with replacement ∝ a mix of ``‖w_r‖²``, ``‖e_r‖²`` and uniform, and
    their estimator weights ``1/(m·q_r)`` (float64, CPU): unbiased row sums. Seeded by the layer name."""
    sq_w, sq_e = (t.to(torch.float64).cpu() for t in state.meta["row_sums"])
    n = sq_w.numel()
    q = 0.1 / n + 0.45 * sq_w / max(float(sq_w.sum()), 1e-300) + 0.45 * sq_e / max(float(sq_e.sum()), 1e-300)
    g = torch.Generator().manual_seed(sum(map(ord, state.name)) % 2**31)  # reproducible per layer
    idx = torch.multinomial(q, m, replacement=True, generator=g)
    return idx, 1.0 / (m * q[idx])


def _sampled_output_metrics(state: LayerState, original: torch.Tensor, x2: torch.Tensor, m: int,
                            backend) -> dict[str, float]:
    """Output and W8A8 errors from ``m`` importance-sampled rows (see :class:`MetricsConfig`).

    The sampled rows are gathered into reused scratch buffers ``_SAMPLE_CHUNK`` at a time; one GEMM
    gives ``x·wᵀ`` and ``x·eᵀ`` (``e = w − codes·scale``, the same float32 operations as
    :func:`_rowwise_metrics`), one int8 GEMM the W8A8 product on the tokens' cached activation codes.
    Same float32 products as an unchunked evaluation; only the float64 sums' order differs (tests:
    ≤ 1e-12 relative).
    """
    idx, weight = _importance_sample(state, m)
    dev = original.device
    weight = weight.to(torch.float32).to(dev)
    idx = idx.to(dev)
    per_row = isinstance(state.granularity, PerRow)
    scale = state.scale.to(torch.float32)
    # W8A8 through the torch reference's own steps, with the tokens' codes cached across layers;
    # any other int8_linear backend is called as it is.
    fast_w8 = select("int8_linear", backend, (x2, state.codes, state.scale)).name == "torch"
    tokens = _token_codes(x2) if fast_w8 else None
    with one_thread(original):
        signal, noise, w8 = _sampled_sums(state, original, x2, idx, weight, scale, per_row, tokens, backend)
    rel = (lambda num: math.sqrt(num / signal) if signal > 0 else 0.0)
    return {"rel_out_x": rel(noise), "w8a8": rel(w8), "output_rows": m}


def _all_rows_output_metrics(state: LayerState, original: torch.Tensor, x2: torch.Tensor, backend) -> dict[str, float]:
    """``rel_out_x`` and ``w8a8`` over every row, through the sampled path's chunks (all rows, weight 1):
    the exact figures of :func:`_rowwise_metrics` / :func:`_w8a8` with float64 sums of the same float32
    products, on one thread, without fresh [rows, K] temporaries (a 1280² layer's report cost 17×
    its quantization with those, measured)."""
    dev = original.device
    n = original.shape[0]
    idx = torch.arange(n, device=dev)
    weight = torch.ones(n, dtype=torch.float32, device=dev)
    fast_w8 = select("int8_linear", backend, (x2, state.codes, state.scale)).name == "torch"
    tokens = _token_codes(x2) if fast_w8 else None
    with one_thread(original):
        signal, noise, w8 = _sampled_sums(state, original, x2, idx, weight, state.scale.to(torch.float32),
                                          isinstance(state.granularity, PerRow), tokens, backend)
    w8a8 = 0.0 if w8 == 0.0 else (math.sqrt(w8 / signal) if signal > 0 else math.inf)
    return {"rel_out_x": math.sqrt(noise / signal) if signal > 0 else 0.0, "w8a8": w8a8}


def _sampled_sums(state, original, x2, idx, weight, scale, per_row, tokens, backend) -> tuple[float, float, float]:
    # On one thread: these are [T, K]×[K, 256] products and [128, K] gathers, too small for a
    # thread team to pay off, and a team of 2 on 2 cores shared with the runner's reader and writer
    # threads waited a scheduler slice at every barrier (each op ~12 ms instead of ~0.3 ms, measured).
    t, k = x2.shape
    f32 = torch.float32
    dev = original.device
    m = idx.numel()
    signal = noise = w8 = 0.0
    for lo in range(0, m, _SAMPLE_CHUNK):
        sel = idx[lo:lo + _SAMPLE_CHUNK]
        c = sel.numel()
        wt = weight[lo:lo + c]
        raw = _SCRATCH.get("raw", (c, k), original.dtype, dev)
        torch.index_select(original, 0, sel, out=raw)
        codes = _SCRATCH.get("codes", (c, k), torch.int8, dev)
        torch.index_select(state.codes, 0, sel, out=codes)
        s = scale.index_select(0, sel) if per_row else scale
        we = _SCRATCH.get("we", (2 * c, k), f32, dev)  # sampled rows of w, then of e: one GEMM
        w, e = we[:c], we[c:]
        w.copy_(raw)
        e.copy_(codes)
        e.mul_(s)
        torch.sub(w, e, out=e)
        prod = _SCRATCH.get("prod", (t, 2 * c), f32, dev)
        torch.mm(x2, we.t(), out=prod)
        ref, err = prod[:, :c], prod[:, c:]
        signal += float((ref.square() * wt).sum(dtype=torch.float64))
        noise += float((err.square() * wt).sum(dtype=torch.float64))
        if tokens is not None:
            qx, sx = tokens
            acc = _int_mm(qx, codes.t()).to(f32)
            y = acc * sx * (s.reshape(1, -1) if s.numel() > 1 else s)
        else:
            y = int8_linear(x2, codes, s, None, backend=backend)
        w8 += float(((y - ref).square() * wt).sum(dtype=torch.float64))
    return signal, noise, w8


def measure(state: LayerState, *, cfg: MetricsConfig = MetricsConfig()) -> LayerState:
    """Record weight-space and output-space quality metrics in ``state.metrics``.

    Example:
        >>> from cq.transforms import absmax_scale, round_to_nearest
        >>> s = measure(round_to_nearest(absmax_scale(LayerState.from_weight("fc", torch.randn(8, 16)))))
        >>> sorted(s.metrics)
        ['max_error', 'mse', 'sqnr_db']
    """
    original = state.original if state.original is not None else state.weight
    if not original.numel():
        return record(state, "measure", cfg, metrics=weight_metrics(original, original))
    x2 = None if cfg.x is None else cfg.x.detach().reshape(-1, cfg.x.shape[-1]).to(torch.float32)
    fused = (_rowwise_ok(state, original) and "row_sums" in state.meta
             and all(k in state.metrics for k in _WEIGHT_KEYS))  # exact weight metrics from the fused sweep
    if fused and cfg.sample_rows and x2 is not None and original.shape[0] > 4 * cfg.sample_rows:
        m = {k: state.metrics[k] for k in _WEIGHT_KEYS}
        m.update(_sampled_output_metrics(state, original, x2, cfg.sample_rows, cfg.backend))
        return record(state, "measure", cfg, metrics=m)
    ref = None
    if fused:  # weight metrics from the fused sweep; output errors over every row, as the sampled path does them
        m = {k: state.metrics[k] for k in _WEIGHT_KEYS}
        if x2 is not None:
            m.update(_all_rows_output_metrics(state, original, x2, cfg.backend))
    elif _rowwise_ok(state, original):
        m, ref = _rowwise_metrics(state, original, x2)
    else:
        e = _error32(original, reconstruct(state))
        m = _weight_metrics(original, e)
        ref = None
        if x2 is not None:
            ref = x2.to(e.dtype) @ original.detach().to(e.dtype).t()
            den = _sq(ref)
            m["rel_out_x"] = math.sqrt(_sq(x2.to(e.dtype) @ e.t()) / den) if den > 0 else 0.0
    if state.hessian is not None and state.codes is not None and "rel_out_h" not in state.metrics:
        m["rel_out_h"] = rel_output_error(state.weight, working_dequantized(state), hessian=state.hessian)
    if (x2 is not None and state.codes is not None and isinstance(state.granularity, (PerTensor, PerRow))
            and (state.basis is None or state.basis.native) and "w8a8" not in m):
        m["w8a8"] = _w8a8(state, x2, ref.to(torch.float32), cfg.backend)
    return record(state, "measure", cfg, metrics=m)
