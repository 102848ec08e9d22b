"""MiniLM: FP8 (float8_e4m3fn, per-tensor) against INT8 (per-row RTN), weight-only and with the runtime's
activation path (ComfyUI: dynamic per-token int8 for int8_tensorwise; per-tensor e4m3 activations for FP8,
dynamic amax or a static input_scale from calibration absmax).

Usage: python scripts/minilm_fp8.py      (about a minute on 2 CPU cores)
1 − cos: mean over held-out sentences of 1 − cosine(embedding, float embedding). Activations in float32
for every row so that only quantization differs (ComfyUI computes in bf16 on GPUs).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cq.calibrate import capture  # noqa: E402
from cq.state import LayerState, PerRow  # noqa: E402
from cq.transforms import ScaleConfig, absmax_scale, reconstruct, round_to_nearest, weight_metrics  # noqa: E402
from cq.transforms.fp8 import Fp8Config, fp8_linear, fp8_pipeline  # noqa: E402
from minilm_gptq import (CALIBRATION_SENTENCES, HELDOUT_SENTENCES, W8A8Linear, embed,  # noqa: E402
                         load_model)


class Fp8Linear(torch.nn.Module):
    """ComfyUI's FP8 forward for one layer (cq.transforms.fp8.fp8_linear) plus the bias."""

    def __init__(self, st, bias, compute_dtype):
        super().__init__()
        self.st, self.bias, self.compute_dtype = st, bias, compute_dtype

    def forward(self, x):
        y = fp8_linear(x, self.st.codes, self.st.scale, input_scale=self.st.meta.get("input_scale"),
                       compute_dtype=self.compute_dtype).reshape(*x.shape[:-1], -1)
        return (y + self.bias if self.bias is not None else y).to(x.dtype)


def quantize(model, stats, kind: str, runtime: bool, compute_dtype=torch.float32):
    q = copy.deepcopy(model)
    sqnr = []
    for name, mod in [(n, m) for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)]:
        w = mod.weight.detach()
        if kind == "int8":
            st = round_to_nearest(absmax_scale(LayerState.from_weight(name, w), cfg=ScaleConfig(PerRow())))
        else:
            meta = {"input_absmax": stats[name].input_absmax} if kind == "fp8_static" else None
            st = fp8_pipeline(Fp8Config(input_scale=kind == "fp8_static"))(LayerState.from_weight(name, w, meta=meta))
        sqnr.append(weight_metrics(w, reconstruct(st))["sqnr_db"])
        parent_name, _, child = name.rpartition(".")
        parent = q.get_submodule(parent_name) if parent_name else q
        if not runtime:
            with torch.no_grad():
                mod.weight.copy_(reconstruct(st))
        elif kind == "int8":
            setattr(parent, child, W8A8Linear(st.codes, st.scale, mod.bias))
        else:
            setattr(parent, child, Fp8Linear(st, mod.bias, compute_dtype))
    return q, sum(sqnr) / len(sqnr)


def main() -> int:
    torch.manual_seed(0)
    tokenizer, model = load_model()
    batches = [tokenizer(CALIBRATION_SENTENCES[i:i + 16], padding=True, truncation=True, return_tensors="pt")
               for i in range(0, len(CALIBRATION_SENTENCES), 16)]
    stats = capture(model, batches)
    ref = embed(model, tokenizer, HELDOUT_SENTENCES)
    rows = [("INT8 per-row RTN", "int8", False, "float (weight-only)"),
            ("INT8 per-row RTN", "int8", True, "int8 per token (W8A8)"),
            ("FP8 e4m3 per-tensor", "fp8", False, "float (weight-only)"),
            ("FP8 e4m3 per-tensor", "fp8", True, "fp8, dynamic amax per call"),
            ("FP8 e4m3 per-tensor", "fp8_static", True, "fp8, static input_scale (calibration absmax)")]
    print(f"MiniLM-L6: {len(stats)} Linear layers; {len(HELDOUT_SENTENCES)} held-out sentences\n")
    print("| weights | activations | mean weight SQNR dB | 1 − cos mean | cos min | time |")
    print("|---|---|---|---|---|---|")
    for label, kind, runtime, acts in rows:
        t0 = time.perf_counter()
        q, sq = quantize(model, stats, kind, runtime)
        cos = (embed(q, tokenizer, HELDOUT_SENTENCES) * ref).sum(-1)
        print(f"| {label} | {acts} | {sq:.2f} | {1 - float(cos.mean()):.2e} | {float(cos.min()):.6f} | "
              f"{time.perf_counter() - t0:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
