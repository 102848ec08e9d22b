"""Whole-file conversion throughput: cq's streaming converter vs a naive eager script, same run.

The baseline is what a user writes by hand: ``safetensors.torch.load_file`` → per-row absmax RTN in
float32 for every 2-D ``.weight`` → ``save_file``. cq additionally computes per-layer metrics,
validates the file it wrote (CRC read-back) and writes atomically.

Usage: python benchmarks/bench_convert.py [--layers 8] [--dim 4096]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cq.api import config_from_legacy_kwargs  # noqa: E402
from cq.convert import convert_file  # noqa: E402


def naive(src: str, dst: str) -> None:
    sd = load_file(src)
    out = {}
    for k, t in sd.items():
        if k.endswith(".weight") and t.ndim == 2:
            w = t.float()
            s = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-30)
            out[k] = torch.round(w / s).clamp(-127, 127).to(torch.int8)
            out[k[:-7] + ".weight_scale"] = s
        else:
            out[k] = t
    save_file(out, dst)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--metrics-tokens", type=int, default=64, help="cq's per-layer W8A8 metric tokens (0: off)")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "model.safetensors")
        tensors = {f"blocks.{i}.fc.weight": (torch.randn(args.dim, args.dim, generator=g) * 0.02).to(torch.bfloat16)
                   for i in range(args.layers)}
        save_file(tensors, src)
        params = args.layers * args.dim * args.dim
        del tensors
        rows = []
        t0 = time.perf_counter()
        naive(src, os.path.join(tmp, "naive.safetensors"))
        rows.append(("naive eager script (load_file → RTN → save_file)", time.perf_counter() - t0))
        for low_memory, label in ((False, "cq, preload"), (True, "cq, --low-memory streaming")):
            _, _, cfg = config_from_legacy_kwargs(
                input_file=src, output_file=os.path.join(tmp, "cq.safetensors"), comfy_quant=True, filter_flags={},
                calib_samples=1, seed=0, low_memory=low_memory, streaming_mode="balanced" if low_memory else "off",
                metrics_tokens=args.metrics_tokens)
            t0 = time.perf_counter()
            convert_file(src, os.path.join(tmp, "cq.safetensors"), cfg)
            rows.append((label, time.perf_counter() - t0))
    base = rows[0][1]
    print(f"{args.layers} × [{args.dim}, {args.dim}] bf16 Linear weights = {params / 1e6:.0f} M parameters, "
          f"{torch.get_num_threads()} threads; peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB\n")
    print("| converter | time | Mparam/s | vs naive |")
    print("|---|---|---|---|")
    for label, t in rows:
        print(f"| {label} | {t:.2f} s | {params / t / 1e6:.0f} | {base / t:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
