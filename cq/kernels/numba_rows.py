"""numba implementation of ``quantize_rows`` (see :mod:`cq.kernels.rows` for the contract).

One sweep per row: the absmax is an integer max over the stored bits (``|x|`` orders like
``bits & 0x7f..`` for IEEE floats, and a NaN wins as it does in ``torch.amax``), then one loop
divides, rounds, stores the code and the error, and a last loop over the (L1-resident) row sums.
bfloat16 and float32 rows are read in their stored form; float16 rows (numba has no float16) are
widened a block at a time by torch.

Determinism: every row is computed by one thread, in a fixed order, whatever the thread count;
rows are spread over a thread pool (the kernels release the GIL). The rounding loop is compiled
without fast-math (exact IEEE division and round-half-even, as the torch reference); only the sum
loop allows reassociation, which changes the report's sums in the last bits, never the codes.
"""

from __future__ import annotations

import concurrent.futures
import threading

import numba
import numpy as np
import torch

from ._memory import empty_huge
from .rows import BLOCK_ROWS, QMAX, SCALE_FLOOR, RowQuant

__all__ = ["quantize_rows_numba"]

_F32_MAX = np.float32(QMAX)
_FLOOR = np.float32(SCALE_FLOOR)


@numba.njit(nogil=True, cache=True)
def _round_row(x, s, codes, err):
    # Exact IEEE arithmetic (no fast-math): the codes must equal the torch reference bit for bit.
    for j in range(x.shape[0]):
        v = x[j]
        q = np.rint(v / s)
        if q > _F32_MAX:
            q = _F32_MAX
        elif q < -_F32_MAX:
            q = -_F32_MAX
        codes[j] = np.int8(q)
        err[j] = v - q * s


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def _row_sums(x, err):
    # Reassociation lets the sums vectorize; it only moves the report's last bits.
    sw = 0.0
    se = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        e = np.float64(err[j])
        sw += v * v
        se += e * e
    return sw, se


@numba.njit(nogil=True, cache=True)
def _max_abs_bits(bits):
    # max |e| as an integer max over the sign-cleared bits: exact, and it vectorizes (a float
    # max reduction does not without fast-math's no-NaN promise); 8x faster measured.
    m = np.uint32(0)
    for j in range(bits.shape[0]):
        b = bits[j] & np.uint32(0x7FFFFFFF)
        m = b if b > m else m
    return m


@numba.njit(nogil=True, cache=True)
def _rows_bf16(bits, lo, hi, codes, scale, sums):
    k = bits.shape[1]
    buf = np.empty(k, dtype=np.uint32)
    x = buf.view(np.float32)
    err = np.empty(k, dtype=np.float32)
    err_bits = err.view(np.uint32)
    one = np.empty(1, dtype=np.uint32)
    one_f = one.view(np.float32)
    for r in range(lo, hi):
        row = bits[r]
        amax = 0
        for j in range(k):
            b = row[j] & 0x7FFF
            amax = b if b > amax else amax
            buf[j] = np.uint32(row[j]) << 16
        one[0] = np.uint32(amax) << 16  # the absmax as float32: its bf16 bits shifted into place
        s = one_f[0] / _F32_MAX
        if s < _FLOOR:
            s = _FLOOR
        scale[r] = s
        _round_row(x, s, codes[r], err)
        sw, se = _row_sums(x, err)
        one[0] = _max_abs_bits(err_bits)
        sums[0, r] = sw
        sums[1, r] = se
        sums[2, r] = one_f[0]


@numba.njit(nogil=True, cache=True)
def _rows_f32(bits, lo, hi, codes, scale, sums):
    k = bits.shape[1]
    err = np.empty(k, dtype=np.float32)
    err_bits = err.view(np.uint32)
    one = np.empty(1, dtype=np.uint32)
    one_f = one.view(np.float32)
    for r in range(lo, hi):
        row = bits[r]
        amax = np.uint32(0)
        for j in range(k):
            b = row[j] & np.uint32(0x7FFFFFFF)
            amax = b if b > amax else amax
        one[0] = amax
        s = one_f[0] / _F32_MAX
        if s < _FLOOR:
            s = _FLOOR
        scale[r] = s
        x = row.view(np.float32)
        _round_row(x, s, codes[r], err)
        sw, se = _row_sums(x, err)
        one[0] = _max_abs_bits(err_bits)
        sums[0, r] = sw
        sums[1, r] = se
        sums[2, r] = one_f[0]


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cq-rows")
        return _POOL


def _run(kernel, bits: np.ndarray, codes: np.ndarray, scale: np.ndarray, sums: np.ndarray, n: int) -> None:
    threads = max(1, torch.get_num_threads())
    # Row ranges are a fixed function of n (blocks of BLOCK_ROWS rows), not of the thread count.
    spans = [(i, min(i + BLOCK_ROWS, n)) for i in range(0, n, BLOCK_ROWS)]
    if threads == 1 or len(spans) == 1:
        kernel(bits, 0, n, codes, scale, sums)
        return
    futures = [_pool(threads).submit(kernel, bits, lo, hi, codes, scale, sums) for lo, hi in spans]
    for f in futures:
        f.result()


def quantize_rows_numba(w: torch.Tensor) -> RowQuant:
    """``quantize_rows`` with the numba kernels (bfloat16/float32 in place, float16 widened per block).

    Example:
        >>> r = quantize_rows_numba(torch.tensor([[1.27, -2.54, 0.01]], dtype=torch.bfloat16))
        >>> r.codes.tolist()
        [[64, -127, 0]]
    """
    n, k = w.shape
    codes = empty_huge((n, k), torch.int8)  # first-touch page faults cost more than the kernel
    scale = torch.empty((n, 1), dtype=torch.float32)
    sums = torch.empty((3, n), dtype=torch.float64)
    if n and k:
        w = w.detach().contiguous()
        c, s, m = codes.numpy(), scale.numpy().reshape(n), sums.numpy()
        if w.dtype == torch.bfloat16:
            _run(_rows_bf16, w.view(torch.int16).numpy().view(np.uint16), c, s, m, n)
        elif w.dtype == torch.float32:
            _run(_rows_f32, w.view(torch.int32).numpy().view(np.uint32), c, s, m, n)
        else:  # float16: widen a block at a time (numba has no float16 type)
            for i in range(0, n, BLOCK_ROWS * 8):
                blk = w[i:i + BLOCK_ROWS * 8].to(torch.float32)
                hi = i + blk.shape[0]
                _run(_rows_f32, blk.view(torch.int32).numpy().view(np.uint32), c[i:hi], s[i:hi], m[:, i:hi],
                     blk.shape[0])
    elif n:
        scale.fill_(SCALE_FLOOR)
        sums.zero_()
    return RowQuant(codes, scale, sums[0], sums[1], sums[2])
