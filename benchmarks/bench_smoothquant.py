"""SmoothQuant exact folds on a synthetic Flux-1-style DiT: whole-model W8A8 error with and without smoothing.

Model: ``tests/flux_tiny.py`` (Flux-1 key names and data flow: double blocks with joint attention,
single blocks, final layer; adaLN ``scale``/``shift`` biases with 1/16 outlier channels and a few
large V rows, so that the modulated activations have outliers as in real DiTs). Calibration: the
float model run on ``--calib`` random inputs; Hessians and per-channel absmax captured per Linear.
Judged on ``--heldout`` *other* random inputs: relative error of the whole model's output under
ComfyUI's W8A8 forward (per-token int8 activations, after ConvRot where the recipe has it) against
the float model. Modulation Linears stay float (as in a typical conversion); every other Linear is
int8. Recipes:

* ``floor``: exact weights, only the activations quantized (what any weight recipe approaches);
* ``RTN``: per-row round-to-nearest; ``ConvRot+RTN``; ``ConvRot+LDLQ`` (cq's QuIP output) using the
  captured Hessians (recaptured on the smoothed model: its inputs changed).

``smoothed`` runs :func:`cq.transforms.smoothquant.smoothquant` (α searched per mapping, with the
recipe's rotation) and folds the factors; the float model is unchanged (``fold error`` column).

    .venv/bin/python benchmarks/bench_smoothquant.py                 # hidden 256, 2 double + 2 single
    .venv/bin/python benchmarks/bench_smoothquant.py --hidden 128 --calib 4
    .venv/bin/python benchmarks/bench_smoothquant.py --flux2   # Flux-2 layout: shared bias-free
                                                               # modulations, SiLU-gated MLPs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import flux_tiny as ft  # noqa: E402

from cq.model import DictView  # noqa: E402
from cq.state import LayerState, PerRow  # noqa: E402
from cq.transforms import ScaleConfig, absmax_scale  # noqa: E402
from cq.transforms.ldlq import LDLQConfig, ldlq  # noqa: E402
from cq.transforms.rounding import working_dequantized  # noqa: E402
from cq.transforms.smoothquant import SmoothQuantConfig, smoothquant  # noqa: E402

_MOD = ("_mod.lin", "modulation.lin", "adaLN_modulation", "modulation_")


def _hadamard(g, dtype=torch.float64):
    from cq.transforms.hadamard import regular_hadamard

    return regular_hadamard(g, dtype=dtype)


def ldlq_weights(sd, stats, groupsize):
    """{layer: dequantized LDLQ weight in the ConvRot basis} for every non-modulation Linear."""
    out = {}
    for name, st in stats.items():
        if any(t in name for t in _MOD):
            continue
        w = ft.rotate(sd[f"{name}.weight"], groupsize).float()
        h = st.hessian.to(torch.float64)
        k = h.shape[0]
        r = torch.block_diag(*[_hadamard(groupsize)] * (k // groupsize))
        hr = (r.T @ h @ r).float()
        s = ldlq(absmax_scale(LayerState.from_weight(name, w, hessian=hr), cfg=ScaleConfig(PerRow())),
                 cfg=LDLQConfig(actorder=True))
        out[name] = working_dequantized(s).to(torch.float64)
    return out


def model_error(sd_ref, sd, inputs, linear, heads):
    num = den = 0.0
    for img, txt, vec in inputs:
        y = ft.forward(sd_ref, img, txt, vec, heads=heads)
        num += float(((ft.forward(sd, img, txt, vec, heads=heads, linear=linear) - y) ** 2).sum())
        den += float((y ** 2).sum())
    return (num / den) ** 0.5


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=4)
    ap.add_argument("--groupsize", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flux2", action="store_true",
                    help="the Flux-2 layout (shared modulations without bias, SiLU-gated MLPs, mlp_ratio 3)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    hd = args.hidden
    heads = max(1, hd // 64)
    sd = ft.make_state_dict(hd, heads=heads, double=args.double, single=args.single, seed=args.seed, flux2=args.flux2)
    calib = [ft.random_inputs(hd, seed=1000 + i, img_tokens=64, txt_tokens=16) for i in range(args.calib)]
    held = [ft.random_inputs(hd, seed=2000 + i, img_tokens=64, txt_tokens=16) for i in range(args.heldout)]

    def fwd_stats(model):
        return ft.calibration_stats(model, calib, heads=heads)

    stats = fwd_stats(sd)
    rows = []
    print(f"{'Flux-2' if args.flux2 else 'Flux-1'}-style DiT, hidden {hd}, {args.double} double + {args.single} single blocks, "
          f"{args.calib} calibration / {args.heldout} held-out inputs (64 image + 16 text tokens each)\n")
    print("| recipe | no smoothing | smoothquant | change | α search + fold (s) | fold error (float) |")
    print("|---|---|---|---|---|---|")
    for label, g, kind in [("floor (exact weights)", None, "floor"), ("RTN per-row", None, "rtn"),
                           (f"floor, ConvRot {args.groupsize}", args.groupsize, "floor"),
                           (f"ConvRot {args.groupsize} + RTN", args.groupsize, "rtn"),
                           (f"ConvRot {args.groupsize} + LDLQ (quip)", args.groupsize, "ldlq")]:
        t0 = time.perf_counter()
        edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=stats, convrot_groupsize=g))
        sd2 = {k: edits.apply(k, v) for k, v in sd.items()}
        t_sq = time.perf_counter() - t0
        fold_err = model_error(sd, sd2, held[:1], ft.plain_linear, heads)
        if kind == "ldlq":
            lin0 = ft.w8a8_linear(weights=ldlq_weights(sd, stats, g), groupsize=g)
            lin1 = ft.w8a8_linear(weights=ldlq_weights(sd2, fwd_stats(sd2), g), groupsize=g)
        else:
            lin0 = lin1 = ft.w8a8_linear(groupsize=g, quantize_weights=kind != "floor")
        e0, e1 = model_error(sd, sd, held, lin0, heads), model_error(sd, sd2, held, lin1, heads)
        rows.append((label, e0, e1))
        print(f"| {label} | {e0:.5f} | {e1:.5f} | {100 * (e1 / e0 - 1):+.1f} % | {t_sq:.2f} | {fold_err:.1e} |")
    rep = edits.report["smoothquant"]
    print(f"\nfolded {len(rep['folded'])} mappings, skipped {len(rep['skipped'])}:")
    for f in rep["folded"]:
        print(f"  {f['mapping']}: α={f['alpha']}, consumers' W8A8 {f['w8a8_rel_before']:.4g} -> {f['w8a8_rel_after']:.4g}")
    for s in rep["skipped"]:
        print(f"  skipped {s['layers']}: {s['reason']}")


if __name__ == "__main__":
    main()
