"""Layer-parallel conversion: wall time of ``torchrun --nproc-per-node N -m cq`` vs one process, same run.

Writes a model of ``--layers`` bf16 ``[dim, dim]`` linears and a real-data calibration file for them,
then converts it with GPTQ (``K³ + N·K²`` per layer: compute-bound) as

* ``cq`` in one process, one thread, and with as many threads as processes below (the baseline a
  user would otherwise run);
* ``torchrun`` with 1 and ``--procs`` processes, one thread each (gloo on the CPU).

Every output is compared byte for byte with the one-process, one-thread file (the thread count
can change float sums, so the baseline with more threads may differ; the distributed runs must not).

Usage: python benchmarks/bench_distributed.py [--layers 12] [--dim 1024] [--procs 2] [--repeat 1]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(d: Path, layers: int, dim: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from cq.calibrate import hessian_finalize, hessian_init, hessian_update
    from cq.io.calibration import save_calibration
    from cq.io import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors, stats = {}, {}
    for i in range(layers):
        key = f"blocks.{i}.mlp.fc.weight"
        tensors[key] = (torch.randn(dim, dim, generator=g) * 0.02).to(torch.bfloat16)
        x = torch.randn(512, dim, generator=g) @ (torch.randn(dim, dim, generator=g) / dim ** 0.5 + torch.eye(dim))
        stats[key[: -len(".weight")]] = hessian_finalize(hessian_update(hessian_init(dim), x))
    src, calib = d / "m.safetensors", d / "calib.safetensors"
    write_safetensors(src, tensors)
    save_calibration(calib, stats)
    return src, calib


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src, calib = make_inputs(d, args.layers, args.dim)
        common = ["-i", str(src), "--optimizer", "gptq", "--calibration-data", str(calib), "--no-progress"]
        rows = [("cq, 1 process, 1 thread", [sys.executable, "-m", "cq"], 1),
                (f"cq, 1 process, {args.procs} threads", [sys.executable, "-m", "cq"], args.procs),
                ("torchrun, 1 process", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc-per-node", "1", "-m", "cq"], 1),
                (f"torchrun, {args.procs} processes", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       "--nproc-per-node", str(args.procs), "-m", "cq"], 1)]
        results = []
        for i, (name, cmd, threads) in enumerate(rows):
            out = d / f"out{i}.safetensors"
            times = [run(cmd + common + ["-o", str(out)], threads) for _ in range(args.repeat)]
            results.append((name, min(times), out))
        ref = results[0][2]
        best = min(t for _, t, _ in results[:2])
        print(f"{args.layers} x [{args.dim}, {args.dim}] bf16, GPTQ with calibration, {os.cpu_count()} CPUs")
        print(f"{'run':<28} {'wall s':>7} {'vs best 1-process':>18}  bytes")
        for name, t, out in results:
            same = "identical" if filecmp.cmp(out, ref, shallow=False) else "DIFFERENT"
            print(f"{name:<28} {t:7.2f} {t / best:18.2f}  {same}")


if __name__ == "__main__":
    main()
