"""The fused per-row RTN op (``quantize_rows``): each backend vs the unfused recipe, same run.

Rows, for one bf16 weight: the unfused stages the default recipe ran before (``absmax_scale`` →
``round_to_nearest`` → ``measure`` weight metrics), ``quantize_rows`` on the torch reference and on
numba, and (``--inductor``) the same block function compiled by ``torch.compile`` (inductor, C++
through gcc). Compile time is reported separately: inductor compiles per shape and per process,
which is what ruled it out (numba's compiled kernels are cached on disk). Each time is the
minimum of ``--repeat`` runs; the machine is shared, so the spread is printed too.

Usage: python benchmarks/bench_rows.py [--n 4096] [--k 4096] [--repeat 5] [--inductor]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cq.kernels import implementations, quantize_rows  # noqa: E402
from cq.state import LayerState  # noqa: E402
from cq.transforms import MetricsConfig, absmax_scale, measure, round_to_nearest  # noqa: E402


def _block(blk: torch.Tensor):
    s = (blk.abs().amax(dim=1, keepdim=True).to(torch.float32) / 127).clamp(min=1e-30)
    w32 = blk.to(torch.float32)
    q = torch.round(w32 / s).clamp(-127, 127)
    e = w32 - q * s
    return q.to(torch.int8), s, (w32.double() ** 2).sum(1), (e.double() ** 2).sum(1), e.abs().amax(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--inductor", action="store_true", help="also compile and time the inductor variant (~20 s)")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(args.n, args.k, generator=g) * 0.02).to(torch.bfloat16)
    state = LayerState.from_weight("fc", w)

    def timed(fn):
        fn()  # warm-up (numba loads its cached kernels on first use)
        ts = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts), max(ts) - min(ts)

    rows = [("unfused: absmax_scale → round_to_nearest → measure",
             timed(lambda: measure(round_to_nearest(absmax_scale(state)), cfg=MetricsConfig())))]
    for impl in implementations("quantize_rows"):
        if impl.available():
            print(f"({impl.name}: {impl.available()})")
            continue
        rows.append((f"quantize_rows, {impl.name}", timed(lambda: quantize_rows(w, backend=impl.name))))
    if args.inductor:
        t0 = time.perf_counter()
        compiled = torch.compile(_block, dynamic=False)
        compiled(w[:256])
        compile_s = time.perf_counter() - t0

        def run():
            return [compiled(w[i:i + 256]) for i in range(0, args.n, 256)]

        rows.append((f"inductor (torch.compile) blocks of 256 rows; compile {compile_s:.1f} s per shape", timed(run)))
    params = args.n * args.k
    base = rows[0][1][0]
    print(f"\n[{args.n}, {args.k}] bf16 weight, {torch.get_num_threads()} threads, min of {args.repeat} runs\n")
    print("| implementation | time | spread | Mparam/s | vs unfused |")
    print("|---|---|---|---|---|")
    for name, (t, spread) in rows:
        print(f"| {name} | {t * 1e3:.1f} ms | {spread * 1e3:.1f} ms | {params / t / 1e6:.0f} | {base / t:.1f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
