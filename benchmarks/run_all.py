"""`make bench`: every benchmark in quick mode, one after another (see each script for full sizes)."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = [
    ["bench_convert.py", "--repeat", "2", "--profile"],
    ["bench_rows.py"],
    ["bench_hadamard.py"],
    ["bench_quip.py"],
    ["bench_gptq.py", "--size", "2048", "--tokens", "4096", "--layer-times"],
    ["bench_kernels.py"],
    ["bench_learned_round.py", "--n", "256", "--k", "512", "--iters", "100"],
    ["bench_smoothquant.py", "--hidden", "128", "--calib", "4", "--heldout", "2"],
]


def main() -> int:
    status = 0
    for args in RUNS:
        print(f"\n## {' '.join(args)}\n", flush=True)
        status |= subprocess.call([sys.executable, os.path.join(HERE, args[0]), *args[1:]])
    return status


if __name__ == "__main__":
    sys.exit(main())
