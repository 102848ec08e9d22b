"""The same bytes on every thread count: a conversion's output is a function of input, config and seed only.

Each conversion runs in a fresh subprocess with ``OMP_NUM_THREADS`` and ``torch.set_num_threads``
set, as a user's run would be. The layers have K = 2048 and 2560 inputs, where GPTQ/LDLQ work in
float32 and MKL's multi-threaded Cholesky used to change thousands of codes (issue 10, item 6).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cq.calibrate import HessianStats
from cq.io.calibration import save_calibration

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"blocks.0.attn.qkv": (48, 2048), "blocks.0.mlp.fc2": (32, 2560)}

OPTIMIZERS = ("quip", "gptq")
_SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from cq.api import convert_to_int8
for opt in sys.argv[5:]:
    convert_to_int8(sys.argv[2], sys.argv[3] + "-" + opt + ".safetensors", comfy_quant=True, filter_flags={},
                    calib_samples=64, seed=0, optimizer=opt, calibration_data_path=sys.argv[4])
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("det")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture's own float sums must not depend on the runner's threads
    try:
        g = torch.Generator().manual_seed(0)
        tensors, stats = {}, {}
        for name, (n, k) in LAYERS.items():
            tensors[f"{name}.weight"] = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
            tensors[f"{name}.bias"] = torch.randn(n, generator=g) * 0.01
            mix = torch.randn(k, k // 8, generator=g, dtype=torch.float64)
            x = (torch.randn(512, k // 8, generator=g, dtype=torch.float64) @ mix.t())
            x[:, torch.randperm(k, generator=g)[:4]] *= 20.0  # outlier channels
            h = (2.0 / 512) * (x.t() @ x) + 1e-3 * torch.eye(k, dtype=torch.float64)
            stats[name] = HessianStats(hessian=h.float(), input_absmax=x.abs().amax(0).float(),
                                       input_mean=x.mean(0).float(), samples=512)
    finally:
        torch.set_num_threads(threads)
    src = d / "model.safetensors"
    save_file(tensors, str(src))
    calib = save_calibration(d / "calib.safetensors", stats)
    return d, src, calib


def _convert(d: Path, src: Path, calib: Path, threads: tuple[int, ...]) -> dict[int, dict[str, str]]:
    """Every optimizer's output digest, from one subprocess per thread count (run side by side)."""
    procs = {}
    for n in threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        procs[n] = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(n), str(src), str(d / f"out-{n}"), str(calib),
                                     *OPTIMIZERS], env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
    for n, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{n} threads: {err[-2000:]}"
    return {n: {opt: hashlib.sha256(Path(f"{d}/out-{n}-{opt}.safetensors").read_bytes()).hexdigest()
                for opt in OPTIMIZERS} for n in threads}


@pytest.mark.slow
def test_output_bytes_do_not_depend_on_the_thread_count(model):
    d, src, calib = model
    digests = _convert(d, src, calib, (1, 2))
    assert digests[1] == digests[2]
