"""Every input kind cq reads, as an example file, converted to INT8 and to FP8 (issue 11, item 1).

Usage: python scripts/fp8_inputs_table.py
For each kind: a 4-layer synthetic model (256×512 Linear weights ~ N(0, 0.02²) with a few outliers) is
stored in that layout; cq reads it (cq.io.fp8_inputs), converts every Linear to int8_tensorwise (per-row
RTN) or float8_e4m3fn, writes a ComfyUI file, validates it and loads it through comfy-kitchen.
SQNR "vs source" compares with the float32 weights before the input file was made (the user's end-to-end
loss); "vs input" with the decoded input (what this conversion adds).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import torch
from safetensors.torch import save_file

from cq.io import UnifiedSafetensorsLoader, comfy_quant_entry, layer_tensors, validate_comfy_file, write_safetensors
from cq.io.comfy_fp8 import fp8_layer_tensors
from cq.io.comfy_kitchen_check import check_with_comfy_kitchen
from cq.io.fp8_inputs import RequantizeWarning, decode_stored, plan_stored_inputs
from cq.model import LoaderView
from cq.state import LayerState, PerRow
from cq.transforms import ScaleConfig, absmax_scale, reconstruct, round_to_nearest, sqnr_db
from cq.transforms.fp8 import fp8_pipeline

LAYERS = [f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "mlp.fc1")]


def source() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in LAYERS:
        w = torch.randn(256, 512, generator=g) * 0.02
        w.view(-1)[torch.randint(0, w.numel(), (20,), generator=g)] *= 8
        out[f"{name}.weight"] = w
        out[f"{name}.bias"] = torch.randn(256, generator=g) * 0.01
    out["norm.weight"] = torch.ones(512)
    return out


def make_input(kind: str, src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in src.items() if not k.endswith(".weight") or k == "norm.weight"}
    out.update({k: v for k, v in src.items() if k.endswith(".bias")})
    for name in LAYERS:
        w = src[f"{name}.weight"]
        if kind in ("bf16", "fp16", "fp32"):
            out[f"{name}.weight"] = w.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[kind])
            continue
        if kind == "fp8_e5m2_unscaled":
            out[f"{name}.weight"] = w.to(torch.float8_e5m2)
            continue
        if kind == "int8_comfy":
            st = round_to_nearest(absmax_scale(LayerState.from_weight(name, w), cfg=ScaleConfig(PerRow())))
            out.update({k: v for k, v in layer_tensors(st).items() if not k.endswith(".bias")})
            continue
        st = fp8_pipeline()(LayerState.from_weight(name, w))
        if kind == "fp8_comfy":
            out.update({k: v for k, v in fp8_layer_tensors(st).items() if not k.endswith(".bias")})
        elif kind in ("fp8_scaled_legacy", "fp8_scale_weight"):
            out[f"{name}.weight"] = st.codes
            out[f"{name}.scale_weight"] = st.scale.reshape(1)
            if kind == "fp8_scaled_legacy":
                out[f"{name}.scale_input"] = torch.ones(())
        elif kind == "fp8_e4m3_unscaled":
            out[f"{name}.weight"] = w.to(torch.float8_e4m3fn)
    if kind == "fp8_scaled_legacy":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def convert(path_in: str, path_out: str, target: str, requantize_int8: bool):
    loader = UnifiedSafetensorsLoader(path_in)
    view = LoaderView(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizeWarning)
        plan = plan_stored_inputs(view, requantize_int8=requantize_int8)
    tensors, decoded = {}, {}
    copy_keys = set(plan.keys_to_copy())
    for key in view.keys():
        if key in plan.drop or key in copy_keys:
            continue
        stem = key[: -len(".weight")]
        if key in plan.decode:
            w = decode_stored(view, plan.decode[key]).weight
        else:
            w = view.tensor(key).to(torch.float32)
        if stem in LAYERS:
            st = LayerState.from_weight(stem, w)
            st = fp8_pipeline()(st) if target == "fp8" else round_to_nearest(absmax_scale(st, cfg=ScaleConfig(PerRow())))
            decoded[stem] = (w, reconstruct(st))
            tensors.update(fp8_layer_tensors(st) if target == "fp8" else layer_tensors(st))
        elif key.endswith(".bias") or key == "norm.weight":
            tensors[key] = w.to(torch.bfloat16) if key == "norm.weight" else w
    for key in copy_keys:
        tensors[key] = view.tensor(key)
    write_safetensors(path_out, tensors)
    return plan, decoded


def main() -> int:
    src = source()
    kinds = ["fp32", "bf16", "fp16", "fp8_scaled_legacy", "fp8_scale_weight", "fp8_comfy", "fp8_e4m3_unscaled",
             "fp8_e5m2_unscaled", "int8_comfy"]
    print("| input kind | decoded layers (layout) | target | SQNR dB vs input | SQNR dB vs source | "
          "comfy-kitchen dequant err | validate |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for kind in kinds:
            pin = os.path.join(d, f"{kind}.safetensors")
            save_file(make_input(kind, src), pin)
            for target, req in (("int8", False), ("fp8", False)) + ((("int8", True),) if kind == "int8_comfy" else ()):
                pout = os.path.join(d, f"{kind}-{target}-{req}.safetensors")
                plan, dec = convert(pin, pout, target, req)
                layouts = sorted({l.layout for l in plan.decode.values()})
                what = f"{len(plan.decode)} ({', '.join(layouts)})" if plan.decode else (
                    f"0; {len(plan.keep)} int8 kept" if plan.keep else "0")
                if dec:
                    vs_in = sum(sqnr_db(w, r) for w, r in dec.values()) / len(dec)
                    vs_src = sum(sqnr_db(src[f"{s}.weight"], r) for s, (w, r) in dec.items()) / len(dec)
                else:  # int8 layers copied unchanged: the file holds the input's codes
                    vs_in = float("inf")
                    vs_src = sum(sqnr_db(src[f"{s}.weight"], reconstruct(round_to_nearest(absmax_scale(
                        LayerState.from_weight(s, src[f"{s}.weight"]), cfg=ScaleConfig(PerRow())))))
                        for s in LAYERS) / len(LAYERS)
                ck = check_with_comfy_kitchen(pout, {f"{s}.weight": src[f"{s}.weight"] for s in LAYERS})
                dq = sum(r["dequant_rel_err"] for r in ck.values()) / len(ck)
                tgt = target + (" (re-quantized)" if req else "") if dec else "int8 (copied)"
                print(f"| {kind} | {what} | {tgt} | {vs_in:.2f} | {vs_src:.2f} | {dq:.4f} | "
                      f"{'ok' if not validate_comfy_file(pout) else validate_comfy_file(pout)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
