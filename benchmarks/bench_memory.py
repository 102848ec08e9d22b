"""Peak memory of one layer's conversion vs :func:`cq.memory.layer_working_set`, and the tiers' budgets.

Each (recipe, shape) runs ``cq.convert.convert_layer`` in a fresh subprocess; the peak is the rise
of ``VmHWM`` (the kernel's resident high-water mark, reset through ``/proc/self/clear_refs``) over
the resident size just before the layer. ``estimate/peak`` must stay above 1 for the budgets of
:mod:`cq.memory` to be upper bounds.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--shapes 1024x1024,3072x1024,1024x4096]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, tempfile, torch
from cq.config import ConvertConfig
from cq.convert import HessianSource, convert_layer, plan_model
from cq.io import UnifiedSafetensorsLoader, write_safetensors
from cq.memory import layer_working_set
from cq.model import LoaderView, ModelEdits
from cq.recipes import GPTQ, QuIP, RTN
from cq.transforms.quip import quip_config_from_legacy

recipe_name, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
recipe = {"RTN": RTN(), "GPTQ": GPTQ(), "QuIP": QuIP(quip_config_from_legacy())}[recipe_name]
cfg = ConvertConfig(recipe=recipe, device="cpu", synthetic_calibration=recipe_name != "RTN", calib_samples=256)
d = tempfile.mkdtemp()
src = os.path.join(d, "m.safetensors")
write_safetensors(src, {"w.weight": (torch.randn(n, k) * 0.02).to(torch.bfloat16)})

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

with UnifiedSafetensorsLoader(src, low_memory=True) as loader:
    view = LoaderView(loader)
    (plan,) = plan_model(view, cfg)
    hessians = HessianSource(cfg, view)
    convert_layer(plan, view, cfg, ModelEdits(), hessians, torch.device("cpu"))  # warm: lazy imports, caches
    hessians = HessianSource(cfg, view)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    convert_layer(plan, view, cfg, ModelEdits(), hessians, torch.device("cpu"))
    peak = status("VmHWM") - before
est = layer_working_set(plan, (n, k), 2, metrics_tokens=cfg.metrics_tokens)
print(json.dumps({"peak": peak, "estimate": est}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1024x1024,3072x1024,1024x4096")
    ap.add_argument("--recipes", default="RTN,GPTQ,QuIP")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"{'recipe':<6} {'shape':>11} {'peak MiB':>9} {'estimate MiB':>13} {'estimate/peak':>14}")
    for recipe in args.recipes.split(","):
        for shape in args.shapes.split(","):
            n, k = (int(x) for x in shape.split("x"))
            out = subprocess.run([sys.executable, "-c", CHILD, recipe, str(n), str(k)], env=env, check=True,
                                 capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{recipe:<6} {shape:>11} {r['peak'] / 2**20:9.1f} {r['estimate'] / 2**20:13.1f} "
                  f"{r['estimate'] / max(r['peak'], 1):14.2f}")


if __name__ == "__main__":
    main()
