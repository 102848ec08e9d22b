"""Convert one synthetic model on two devices and compare: identical codes for RTN, equal proxy loss for GPTQ/LDLQ.

Usage: python scripts/device_parity.py [--a cpu] [--b cuda] [--backend-b auto|triton] [--layers 4] [--k 1024]

Prints one row per recipe with the wall time on each device, the number of differing codes and the
largest relative difference of the proxy loss (``rel_out_h``). Exit status 1 when RTN codes differ or
a GPTQ/LDLQ proxy loss differs by more than 1 % (float32 reductions differ between devices, and the
error feedback turns a flipped tie into a few different codes at the same loss).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cq import ConvertConfig, GPTQ, QuIP, RTN, convert_file  # noqa: E402
from cq.calibrate import HessianStats  # noqa: E402
from cq.io.calibration import save_calibration  # noqa: E402
from cq.io import UnifiedSafetensorsLoader, write_safetensors  # noqa: E402
from cq.synthetic import outlier_layer  # noqa: E402


def build(folder: str, layers: int, k: int) -> tuple[str, str]:
    tensors, stats = {}, {}
    for i in range(layers):
        layer = outlier_layer(n=k, k=k, t=2 * k, seed=i)
        name = f"blocks.{i}.mlp.fc"
        tensors[name + ".weight"] = layer.weight.to(torch.bfloat16)
        x = layer.inputs
        stats[name] = HessianStats(hessian=layer.hessian, input_absmax=x.abs().amax(0), input_mean=x.mean(0),
                                   samples=x.shape[0])
    model = os.path.join(folder, "model.safetensors")
    write_safetensors(model, tensors)
    calib = os.path.join(folder, "calib.safetensors")
    save_calibration(calib, stats)
    return model, calib


def run(model: str, out: str, cfg: ConvertConfig):
    t0 = time.perf_counter()
    report = convert_file(model, out, cfg)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    with UnifiedSafetensorsLoader(out, low_memory=True) as f:
        codes = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight")}
    return time.perf_counter() - t0, codes, {r.name: r.metrics.get("rel_out_h") for r in report.quantized}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", default="cpu")
    ap.add_argument("--b", default="cuda")
    ap.add_argument("--backend-b", default="auto")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--k", type=int, default=1024)
    args = ap.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as d:
        model, calib = build(d, args.layers, args.k)
        print(f"{'recipe':<8} {'t ' + args.a:>10} {'t ' + args.b:>10} {'codes differ':>13} {'max Δloss':>10}")
        for name, recipe, data in (("RTN", RTN(), None), ("GPTQ", GPTQ(), calib), ("QuIP", QuIP(), calib)):
            res = []
            for dev, backend in ((args.a, "auto"), (args.b, args.backend_b)):
                cfg = ConvertConfig(recipe=recipe, calibration_path=data, device=dev, backend=backend)
                res.append(run(model, os.path.join(d, f"{name}_{dev.replace(':', '_')}.safetensors"), cfg))
            (ta, ca, la), (tb, cb, lb) = res
            differ = sum(int((ca[k] != cb[k]).sum()) for k in ca)
            dl = max((abs(la[n] - lb[n]) / max(la[n], 1e-30) for n in la if la[n] is not None), default=0.0)
            print(f"{name:<8} {ta:>9.2f}s {tb:>9.2f}s {differ:>13} {dl:>10.2e}")
            ok &= (differ == 0) if name == "RTN" else dl <= 0.01
    print("parity: ok" if ok else "parity: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
