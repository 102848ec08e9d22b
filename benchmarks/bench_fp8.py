"""FP8 quantization and fp8-input decoding speed, against the best-known baselines in the same run.

Rows (one bf16 weight of --dim × --dim, minimum of --repeat runs, single thread unless OMP says otherwise):

* quantize: cq ``fp8_pipeline`` (check_finite → per-tensor scale → e4m3 RNE with saturation) against
  comfy-kitchen's own ``TensorCoreFP8Layout.quantize`` (what ComfyUI runs to re-quantize after a LoRA),
  and cq's default INT8 per-row RTN for scale;
* decode: ``cq.io.fp8_inputs.decode_stored`` of a ComfyUI fp8 layer against the bare ``codes.float() * scale``.

Usage: python benchmarks/bench_fp8.py [--dim 4096] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from timing import best_of  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    from cq.io.comfy_fp8 import fp8_layer_tensors
    from cq.io.fp8_inputs import decode_stored, find_stored_layers
    from cq.model import DictView
    from cq.recipes import rtn_pipeline
    from cq.state import LayerState
    from cq.transforms.fp8 import fp8_pipeline

    w = (torch.randn(a.dim, a.dim, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    mb = w.numel() * 2 / 2**20
    rows = []
    t_cq = best_of(lambda: fp8_pipeline()(LayerState.from_weight("fc", w)), a.repeat)
    rows.append(("quantize", "cq fp8_pipeline", t_cq))
    try:
        from comfy_kitchen.tensor import get_layout_class

        layout = get_layout_class("TensorCoreFP8Layout")
        t_ck = best_of(lambda: layout.quantize(w), a.repeat)
        rows.append(("quantize", "comfy-kitchen TensorCoreFP8Layout.quantize", t_ck))
    except ImportError:
        t_ck = None
    rows.append(("quantize", "cq int8 per-row RTN (rtn_pipeline)", best_of(lambda: rtn_pipeline()(LayerState.from_weight("fc", w)), a.repeat)))
    st = fp8_pipeline()(LayerState.from_weight("fc", w))
    view = DictView(fp8_layer_tensors(st))
    layer = find_stored_layers(view)["fc.weight"]
    t_dec = best_of(lambda: decode_stored(view, layer), a.repeat)
    t_raw = best_of(lambda: st.codes.float() * st.scale, a.repeat)
    rows += [("decode", "cq decode_stored", t_dec), ("decode", "codes.float() * scale", t_raw)]
    base = {"quantize": t_ck or t_cq, "decode": t_raw}
    print(f"{a.dim}×{a.dim} bf16 weight ({mb:.0f} MiB), {torch.get_num_threads()} thread(s), best of {a.repeat}\n")
    print("| step | implementation | ms | MiB/s | × baseline |")
    print("|---|---|---|---|---|")
    for step, name, t in rows:
        print(f"| {step} | {name} | {t * 1e3:.1f} | {mb / t:.0f} | {t / base[step]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
