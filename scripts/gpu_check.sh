#!/usr/bin/env bash
# One-shot check of cq's Triton kernels on a CUDA machine: compiled (not interpreted) parity tests,
# the kernel doctests, the torch-vs-Triton benchmark, then a whole conversion on CPU vs CUDA. Budget: under 5 minutes, most of it Triton
# compiling each kernel variant and timing 3 autotune configs per new (N, K).
#
# Usage:   scripts/gpu_check.sh            (from anywhere; it runs in the repository root)
# Env:     PYTHON  interpreter with CUDA torch + triton (default: .venv/bin/python if it sees CUDA, else python3)
#          OUT     folder for the logs (default: out/gpu_check); env.txt, pytest.log, bench.txt, summary.txt
#          PYDEPS  optional folder of pure-Python deps made with `pip install --target=DIR attrs toolz
#                  safetensors pytest`, prepended to PYTHONPATH (for machines without network access)
# Exit:    0 all passed; 1 a test or the benchmark failed; 2 no usable CUDA Python found.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LOG="${OUT:-out/gpu_check}"
mkdir -p "$LOG"
# The root conftest.py only *defaults* TRITON_INTERPRET to 1; an explicit 0 compiles the kernels for the GPU.
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYDEPS:+:$PYDEPS}${PYTHONPATH:+:$PYTHONPATH}"

sees_cuda() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && sees_cuda "$candidate"; then PY="$candidate"; break; fi
    done
fi
if [[ -z "$PY" ]] || ! sees_cuda "$PY"; then
    echo "gpu_check: no Python with a CUDA-enabled torch found (set PYTHON=...)" | tee "$LOG/summary.txt"
    exit 2
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
    "$PY" -c 'import attrs, toolz, safetensors, pytest; print("deps ok")'
} 2>&1 | tee "$LOG/env.txt"

timeout 210 "$PY" -m pytest tests/kernels cq/kernels -q -p no:cacheprovider -rs --durations=10 2>&1 | tee "$LOG/pytest.log"
tests_rc=${PIPESTATUS[0]}

timeout 60 "$PY" benchmarks/bench_kernels.py 2>&1 | tee "$LOG/bench.txt"
bench_rc=${PIPESTATUS[0]}

# End to end: the same model converted on the CPU and on CUDA (Triton backend): identical RTN codes,
# equal GPTQ/LDLQ proxy loss, and the wall time of both.
timeout 240 "$PY" scripts/device_parity.py --a cpu --b cuda --backend-b triton 2>&1 | tee "$LOG/parity.txt"
parity_rc=${PIPESTATUS[0]}

echo "pytest rc=$tests_rc bench rc=$bench_rc parity rc=$parity_rc (124 = timed out)" | tee "$LOG/summary.txt"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 && $parity_rc -eq 0 ]] || exit 1
