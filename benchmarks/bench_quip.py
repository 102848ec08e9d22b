"""QuIP in cq: every rounding/rotation choice on one outlier-heavy layer, same run, same data.

Layer (algorithms.md §8; the same generator as ``tests/test_quip.py``): W ``[N, K]`` with Student-t
(ν = 4) entries, log-normal row/column scales and 0.01 % ×10 outlier entries; X ``[T, K]`` with
correlated features (decaying spectrum), log-normal channel scales and 0.5 % ×20 outlier channels;
H = 2/T·XᵀX. Per-row INT8 scales unless stated.

Columns: ``rel-out`` = ‖(W−Ŵ)Xᵀ‖/‖WXᵀ‖ through H (weights only), ``out-SQNR`` = −20·log10(rel-out),
``W8A8`` = ComfyUI's runtime error (dynamic per-token int8 activations, ConvRot activation rotation
when the layer has it) on T/2 tokens, ``time`` = wall seconds of the pipeline (2 shared cores vary).
Ratios are against per-row RTN from the same run.

    .venv/bin/python benchmarks/bench_quip.py                  # 512 × 1024, T = 4096
    .venv/bin/python benchmarks/bench_quip.py --n 256 --k 512 --tokens 2048
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from cq.state import LayerState, PerGroup, PerRow
from cq.transforms import ScaleConfig, absmax_scale, rel_output_error, round_to_nearest, w8a8_output_error
from cq.transforms.convrot import convrot
from cq.transforms.gptq import GPTQConfig, gptq_update
from cq.transforms.rounding import reconstruct as incoherence_reconstruct
from cq.transforms.quip import QuIPConfig, quip_pipeline
from cq.synthetic import outlier_layer as synthetic_outlier_layer

F64 = torch.float64




def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    w, x, h = synthetic_outlier_layer(args.n, args.k, args.tokens, seed=args.seed)
    xt = x[: args.tokens // 2]
    s = LayerState.from_weight("blk.fc", w, hessian=h)
    row = ScaleConfig(PerRow())
    methods = [
        ("RTN per-row", lambda: round_to_nearest(absmax_scale(s, cfg=row))),
        ("RTN 1×128 groups (int8_blockwise, not native)", lambda: round_to_nearest(
            absmax_scale(s, cfg=ScaleConfig(PerGroup(128))))),
        ("GPTQ per-row", lambda: gptq_update(absmax_scale(s, cfg=row))),
        ("GPTQ per-row + act-order", lambda: gptq_update(absmax_scale(s, cfg=row), cfg=GPTQConfig(actorder=True))),
        ("ConvRot g256 + RTN", lambda: round_to_nearest(absmax_scale(convrot(s), cfg=row))),
        ("**ConvRot g256 + LDLQ (quip, cq default)**", lambda: quip_pipeline()(s)),
        ("ConvRot + LDLQ, checkpointed (4 row segments)",
         lambda: quip_pipeline(QuIPConfig(checkpointed=True, checkpoint_threshold=1))(s)),
        ("two-sided QuIP, transformed (custom loader)", lambda: quip_pipeline(QuIPConfig(store_transformed=True))(s)),
        ("two-sided QuIP → requant per-row (reference default)", lambda: quip_pipeline(QuIPConfig(output="requant"))(s)),
        ("two-sided QuIP → requant 1×128 groups", lambda: quip_pipeline(
            QuIPConfig(output="requant", requant_scheme="block"))(s)),
    ]
    rows = []
    for name, fn in methods:
        t0 = time.perf_counter()
        st = fn()
        dt = time.perf_counter() - t0
        rel = rel_output_error(w, incoherence_reconstruct(st), hessian=h)
        try:
            a8 = f"{w8a8_output_error(st, xt):.5f}"
        except ValueError:
            a8 = "n/a (not runnable by ComfyUI)"
        if "incoherence" in st.meta:
            a8 = "n/a (custom loader)"
        rows.append((name, rel, a8, dt))
    base = rows[0][1]
    print(f"QuIP on a {args.n}×{args.k} outlier layer, T = {args.tokens} (W8A8 on {xt.shape[0]} tokens), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print("| method | rel-out | out-SQNR (dB) | vs RTN per-row | W8A8 error | time (s) |")
    print("|---|---|---|---|---|---|")
    for name, rel, a8, dt in rows:
        print(f"| {name} | {rel:.5f} | {-20 * math.log10(rel):.1f} | {base / rel:.2f}× | {a8} | {dt:.2f} |")


if __name__ == "__main__":
    main()
