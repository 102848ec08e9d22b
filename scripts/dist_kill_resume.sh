#!/usr/bin/env bash
# SIGKILL a 2-process torchrun conversion (the agent and its workers, by pid) after a few layers,
# rerun the same command, and compare the bytes with a one-process run.
# Usage: OMP_NUM_THREADS=1 scripts/dist_kill_resume.sh [layers=12] [dim=1024] [kill_after=4]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
layers=${1:-12}; dim=${2:-1024}; after=${3:-4}
d=$(mktemp -d); trap 'rm -rf "$d"' EXIT
export PYTHONPATH=$root OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$py" -c "import sys; from pathlib import Path; sys.path.insert(0, '$root')
from benchmarks.bench_distributed import make_inputs; make_inputs(Path('$d'), $layers, $dim)"
cd "$d"
args=(-i m.safetensors --optimizer gptq --calibration-data calib.safetensors --no-progress)
"$py" -m cq "${args[@]}" -o one.safetensors > /dev/null 2>&1
"$py" -m torch.distributed.run --standalone --nproc-per-node 2 -m cq "${args[@]}" -o two.safetensors > run1.log 2>&1 &
agent=$!
n=0
for _ in $(seq 600); do
  n=$( (cat .two.safetensors.cq-work/done.rank*.jsonl 2>/dev/null || true) | wc -l)
  [ "$n" -ge "$after" ] && break
  sleep 0.05
done
workers=$(pgrep -P "$agent" || true)
kill -9 $workers "$agent" 2>/dev/null || true  # the workers too: they outlive a killed agent
wait "$agent" 2>/dev/null || true
echo "killed with $n of $layers layers done; output exists: $([ -e two.safetensors ] && echo yes || echo no)"
"$py" -m torch.distributed.run --standalone --nproc-per-node 2 -m cq "${args[@]}" -o two.safetensors > run2.log 2>&1
grep -h "resuming" run2.log || true
cmp one.safetensors two.safetensors && echo "bytes identical to the one-process run"
