"""Learned rounding and the QuIP refinements on one outlier-heavy layer: held-out quality and time.

Layer: :func:`cq.synthetic.outlier_layer` (the README's and ``bench_quip.py``'s generator). The
Hessian is built from the first half of the tokens (calibration); every method is judged on the
*second* half (held out): ``held-out`` = ‖(W−Ŵ)Xᵀ‖/‖WXᵀ‖ there. ``calib`` is the same quantity on the
calibration tokens (the objective the refinements minimise). Per-row INT8 scales. Ratios are
against LDLQ (act-order) in the same basis and run; ``time`` is the wall time of the refinement
stage alone (the start's time is in its own row), 1 thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_learned_round.py            # 512 × 1024, T = 4096
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_learned_round.py --n 256 --k 512 --iters 100
"""

from __future__ import annotations

import argparse
import time

from cq.state import LayerState, PerRow
from cq.synthetic import outlier_layer
from cq.transforms import ScaleConfig, absmax_scale, rel_output_error, round_to_nearest
from cq.transforms.convrot import ConvRotConfig, convrot
from cq.transforms.ldlq import LDLQConfig, ldlq
from cq.transforms.learned_round import LearnedRoundConfig, learned_round
from cq.transforms.quip_refine import (GreedyCDConfig, RepassConfig, ScaleMultiplyConfig, frobenius_rescale,
                                       greedy_cd, ldlq_repass, scale_multiply)
from cq.transforms.rounding import reconstruct


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=200, help="learned-rounding iterations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    w, x, _ = outlier_layer(args.n, args.k, args.tokens, seed=args.seed)
    half = args.tokens // 2
    xc, xt = x[:half], x[half:]
    hc = 2.0 / half * xc.T @ xc
    print(f"W {args.n}×{args.k}, {half} calibration + {args.tokens - half} held-out tokens, per-row INT8, "
          f"learned rounding {args.iters} iterations\n")
    print("| basis | method | calib rel-out | held-out rel-out | held-out vs LDLQ | time (s) |")
    print("|---|---|---|---|---|---|")
    for basis in ("none", "convrot"):
        s0 = LayerState.from_weight("blk.fc", w, hessian=hc)
        if basis == "convrot":
            s0 = convrot(s0, cfg=ConvRotConfig("auto"))
        sc = absmax_scale(s0, cfg=ScaleConfig(PerRow()))
        rtn, t_rtn = timed(round_to_nearest, sc)
        start, t_ldlq = timed(ldlq, sc, cfg=LDLQConfig(actorder=True))

        def held(st):
            return rel_output_error(w, reconstruct(st), x=xt)

        def calib(st):
            return rel_output_error(w, reconstruct(st), x=xc)

        ref = held(start)
        rows = [("RTN", rtn, t_rtn), ("LDLQ (act-order)", start, t_ldlq)]
        it = args.iters
        for label, fn in [
            ("LDLQ + 1 re-pass (ldlq_iterations=2)", lambda: ldlq_repass(start, cfg=RepassConfig(1))),
            ("LDLQ + 4 re-passes (ldlq_iterations=5)", lambda: ldlq_repass(start, cfg=RepassConfig(4))),
            ("LDLQ + greedy CD 100", lambda: greedy_cd(start, cfg=GreedyCDConfig(100))),
            ("LDLQ + Frobenius refit (rho 1)", lambda: frobenius_rescale(start)),
            ("rho 0.97: clip, LDLQ, refit", lambda: frobenius_rescale(ldlq(scale_multiply(
                sc, cfg=ScaleMultiplyConfig(0.97)), cfg=LDLQConfig(actorder=True)))),
            (f"LDLQ + learned_round original (SignSGD) {it}", lambda: learned_round(
                start, cfg=LearnedRoundConfig(optimizer="original", num_iter=it))),
            (f"LDLQ + learned_round adamw {it}", lambda: learned_round(
                start, cfg=LearnedRoundConfig(optimizer="adamw", num_iter=it))),
            (f"LDLQ + learned_round radam {it}", lambda: learned_round(
                start, cfg=LearnedRoundConfig(optimizer="radam", num_iter=it))),
            (f"RTN + learned_round adamw lr 0.05 {it} (AdaRound)", lambda: learned_round(
                rtn, cfg=LearnedRoundConfig(optimizer="adamw", lr=0.05, num_iter=it))),
            (f"RTN + learned_round, data-free SVD objective {it}", lambda: learned_round(
                rtn, cfg=LearnedRoundConfig(optimizer="adamw", num_iter=it, objective="svd"))),
        ]:
            out, t = timed(fn)
            rows.append((label, out, t))
        for label, st, t in rows:
            h = held(st)
            print(f"| {basis} | {label} | {calib(st):.5f} | {h:.5f} | {h / ref:.3f} | {t:.2f} |")


if __name__ == "__main__":
    main()
