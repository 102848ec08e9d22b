"""Time the kernel ops per backend: ``quantize_int8`` and ``int8_linear``, torch reference vs Triton.

Usage::

    python benchmarks/bench_kernels.py                 # default sizes for the device found
    python benchmarks/bench_kernels.py --sizes 1024,4096 --tokens 512 --repeat 20

Triton is timed only on CUDA. On CPU, Triton exists only as the numpy interpreter
(``TRITON_INTERPRET=1``), which is a correctness tool, not a performance backend, so only torch is
timed there. Ratios are against the torch reference measured in the same process on the same inputs;
every Triton result is also checked against the reference before it is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cq.kernels import int8_linear, quantize_int8, select  # noqa: E402
from cq.kernels import triton_kernels as tk  # noqa: E402


def _time(fn, *, repeat: int, cuda: bool) -> float:
    """Median seconds of ``repeat`` calls after two warm-up calls (JIT compile, autotune, caches)."""
    fn()
    fn()
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cases(sizes: list[int], tokens: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    for n in sizes:
        w = torch.randn(n, n, generator=g).to(device=device, dtype=torch.bfloat16)
        scale = (w.float().abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-30)
        yield "quantize_int8", f"{n}x{n} bf16, [N,1] scale", (w, scale)
        codes = quantize_int8(w, scale, backend="torch")
        x = torch.randn(tokens, n, generator=g).to(device=device, dtype=torch.bfloat16)
        bias = torch.randn(n, generator=g).to(device)
        yield "int8_linear", f"T={tokens} K={n} N={n} bf16", (x, codes, scale, bias)


def _call(op: str, args, backend: str):
    if op == "quantize_int8":
        return lambda: quantize_int8(*args, backend=backend)
    x, codes, scale, bias = args
    return lambda: int8_linear(x, codes, scale, bias, backend=backend)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,8192" if cuda else "1024,4096",
                        help="comma-separated square layer sizes N=K")
    parser.add_argument("--tokens", type=int, default=2048 if cuda else 256, help="rows of x for int8_linear")
    parser.add_argument("--repeat", type=int, default=20 if cuda else 5)
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    on_cuda = args.device == "cuda"

    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if on_cuda else f", {torch.get_num_threads()} threads"))
    why = tk.triton_unavailable_reason()
    time_triton = on_cuda and why is None and not tk.INTERPRET
    if not time_triton:
        if tk.INTERPRET:
            why = "TRITON_INTERPRET=1: the interpreter is a correctness tool, not a performance backend"
        elif not on_cuda and why is None:
            why = "Triton kernels need CUDA tensors"
        print(f"triton not timed: {why}; timing torch only")

    rows, auto = [], {}
    for op, shape, case in _cases(sizes, args.tokens, args.device, seed=0):
        backends = ["torch"] + (["triton"] if time_triton else [])
        base = None
        for backend in backends:
            fn = _call(op, case, backend)
            if backend != "torch":
                got, ref = fn(), _call(op, case, "torch")()
                if op == "quantize_int8" and not torch.equal(got, ref):
                    raise SystemExit(f"{op} {shape}: triton codes differ from the reference")
                if op == "int8_linear" and not torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()):
                    raise SystemExit(f"{op} {shape}: triton output differs from the reference")
            t = _time(fn, repeat=args.repeat, cuda=on_cuda)
            base = t if base is None else base
            rows.append((op, shape, backend, t * 1e3, base / t))
        auto[op] = select(op, "auto", case[:3]).name

    header = ("op", "shape", "backend", "median ms", "speed-up vs torch")
    table = [header] + [(r[0], r[1], r[2], f"{r[3]:.3f}", f"{r[4]:.2f}x") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("backend='auto' picks: " + ", ".join(f"{op} -> {name}" for op, name in auto.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
