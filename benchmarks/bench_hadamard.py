"""Hadamard transform speed: cq's Kronecker-GEMM form against a dense GEMM and a butterfly, same run.

Transforms an R×n float32 matrix along its last dim (default 8192 × 4096, algorithms.md §8.6):

* ``cq hadamard_transform``: ``H₄₀₉₆ = S₆₄ ⊗ S₆₄`` applied as two GEMMs over reshaped views;
* ``cq randomized (signs)``: the same plus the ±1 sign multiply (what QuIP's incoherence runs);
* ``cq ConvRot g256``: comfy-kitchen's block-diagonal regular Hadamard (``H₁₆ ⊗ H₁₆`` per group);
* ``dense GEMM x @ H``: one n×n GEMM (``2n²`` flops per row);
* ``butterfly (log2 n passes)``: the natural-order FWHT written as vectorized torch passes
  (quip-sharp's ``matmul_hadU`` style; the baseline of the ratios);
* ``copy``: ``clone`` of the input, the memory-traffic floor.

Every result is checked against the dense product before timing. Times are the best of
``--repeat`` runs (wall seconds; 2 shared cores vary 2-3×).

    .venv/bin/python benchmarks/bench_hadamard.py
    .venv/bin/python benchmarks/bench_hadamard.py --rows 1024 --n 3072
"""

from __future__ import annotations

import argparse
import math

import torch
from timing import best_of

from cq.transforms.convrot import ConvRot
from cq.transforms.hadamard import hadamard_matrix, hadamard_transform, orthogonal_transform, transform_plan


def butterfly(x: torch.Tensor) -> torch.Tensor:
    """Natural-order FWHT as log2(n) vectorized passes, normalized (n a power of two)."""
    n = x.shape[-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack([a + b, a - b], dim=2)
        h *= 2
    return y.reshape(x.shape) / math.sqrt(n)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.n)
    n = args.n
    pow2 = n & (n - 1) == 0
    plan = transform_plan(n)
    t_rand = orthogonal_transform(n, seed=0)
    dense = hadamard_matrix(n, dtype=torch.float32) if plan.is_hadamard else t_rand.matrix(torch.float32)
    rot = ConvRot(256) if n % 256 == 0 else None

    # correctness on a slice before timing
    xs = x[:64]
    ref = (xs.double() @ dense.double()).float()
    if plan.is_hadamard:
        assert float((hadamard_transform(xs) - ref).abs().max()) < 1e-4
    if pow2:
        assert float((butterfly(xs) - ref).abs().max()) < 1e-4

    rows = [
        ("copy (memory floor)", lambda: x.clone()),
        ("cq hadamard_transform (Kronecker GEMMs)", lambda: hadamard_transform(x)),
        ("cq randomized (signs + Kronecker GEMMs)", lambda: t_rand.apply(x)),
    ]
    if rot is not None:
        rows.append(("cq ConvRot g256 (block-diagonal)", lambda: rot.rotate(x)))
    rows.append(("dense GEMM x @ H", lambda: x @ dense))
    if pow2:
        rows.append(("butterfly (log2 n passes)", lambda: butterfly(x)))
    times = {name: best_of(fn, args.repeat) for name, fn in rows}
    base_name = "butterfly (log2 n passes)" if pow2 else "dense GEMM x @ H"
    base = times[base_name]
    gb = x.numel() * 4 * 2 / 1e9
    print(f"Hadamard of a {args.rows}×{n} float32 matrix along n = {n}, plan {plan.factors}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeat}")
    print()
    print(f"| method | time (s) | GB/s (read+write) | speed-up vs {base_name} |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.3f} | {gb / t:.2f} | {base / t:.1f}× |")


if __name__ == "__main__":
    main()
