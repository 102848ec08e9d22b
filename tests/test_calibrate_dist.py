"""Data-parallel calibration: 2 gloo processes, each on its share of the inputs, equal one process's statistics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cq.calibrate import capture
from cq.calibrate_dist import all_reduce_stats, capture_distributed
from tests.dist_capture_worker import flat, model_and_inputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_ranks_reduce_to_the_single_process_statistics(tmp_path):
    out = tmp_path / "stats.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(ROOT / "tests" / "dist_capture_worker.py"), str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(out))
    model, inputs = model_and_inputs()
    # The ranks run on one thread each (OMP_NUM_THREADS=1 above); so does the reference, so that every
    # activation is the same float32 computation (a threaded GEMM may sum in another order).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = flat(capture(model, inputs, w8a8=["none", 16]))
    finally:
        torch.set_num_threads(threads)
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key]
        if key.endswith((".samples", ".absmax")):
            assert torch.equal(g, w), key  # counts add, maxima are exact
            continue
        # Each rank's statistics are float32-rounded before the float64 reduction and the result is
        # rounded again: |error| <= 2^-24 (Σ_r T_r/T |S_r| + |S|) and, with shares of at least a third
        # of the tokens, |S_r| <= 3 max|S|: below 2^-21 max|S|.
        bound = 2.0 ** -21 * float(w.abs().max())
        assert float((g.double() - w.double()).abs().max()) <= bound, key


def test_one_process_is_the_identity():
    model, inputs = model_and_inputs()
    a, b = capture_distributed(model, inputs), capture(model, inputs)
    assert all(torch.equal(a[k].hessian, b[k].hessian) for k in b)
    assert all_reduce_stats(b) == b
