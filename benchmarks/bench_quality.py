"""Quality of every INT8 recipe against ComfyUI's W8A8 activation-only floor, on held-out data.

Two workloads, each calibrated on one set of inputs and judged on another:

* **MiniLM** (all-MiniLM-L6-v2, 37 Linears): statistics captured on the calibration sentences of
  ``scripts/minilm_gptq.py``; judged by mean ``1 − cos`` of the sentence embeddings against the float
  model on its held-out sentences, with the quantized weights only (W8) and under ComfyUI's int8
  runtime (W8A8: rotate, per-token int8 activations). The *floor* runs the exact float weights
  through the same activation path: no weight recipe can go below it.
* **DiT-like**: six outlier-heavy layers from :func:`cq.synthetic.outlier_layer` (K = 512 mostly,
  DiT block shapes), calibrated on the first half of each layer's tokens, judged on the second.
  Median over layers of the output SQNR in dB (``−20·log10 rel-err``), W8 and W8A8, and the W8A8
  error as a ratio to per-row RTN from the same run.

Recipes (per-row scales throughout): ``rtn``, ``gptq``, ``convrot_rtn``, ``quip`` (ConvRot + LDLQ,
today's default), then each new piece on top of ``quip``: ``+w8a8`` (W8A8-aware rounding, noise
model), ``+w8a8full`` (full empirical cross term, ridge 0.1), ``+search`` (Hessian-weighted scale
search with LDLQ), ``+bias`` (bias correction, MiniLM only: the synthetic layers have no bias), their
combination, and the data-free ``convrot_rtn+search`` (weight-MSE scale search). ``s/layer`` is the
quantization time per layer (2 shared cores: compare within a run).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_quality.py            # both workloads
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_quality.py --only dit --recipes quip,quip+w8a8
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import attrs  # noqa: E402
import torch  # noqa: E402

from cq.calibrate import activation_stats, capture  # noqa: E402
from cq.kernels import int8_linear, quantize_activations_ref  # noqa: E402
from cq.state import LayerState, PerRow  # noqa: E402
from cq.synthetic import outlier_layer  # noqa: E402
from cq.transforms import ScaleConfig, absmax_scale, reconstruct, round_to_nearest  # noqa: E402
from cq.transforms.bias_correction import BiasCorrectionConfig, bias_correction  # noqa: E402
from cq.transforms.convrot import ConvRot, convrot  # noqa: E402
from cq.transforms.gptq import GPTQConfig, gptq_update  # noqa: E402
from cq.transforms.hessian import DampingConfig  # noqa: E402
from cq.transforms.hessian_shrink import HessianShrinkConfig, shrink_hessian  # noqa: E402
from cq.transforms.ldlq import LDLQConfig, ldlq  # noqa: E402
from cq.transforms.scale_search import ScaleSearchConfig, scale_search  # noqa: E402
from cq.transforms.w8a8_round import W8A8RoundConfig, w8a8_round  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

ROW = ScaleConfig(PerRow())
LDLQ_ACT = LDLQConfig(actorder=True)  # what quip_pipeline's default runs


def _rot(s):
    return convrot(s)


RECIPES = {
    "rtn": lambda s: round_to_nearest(absmax_scale(s, cfg=ROW)),
    "gptq": lambda s: gptq_update(absmax_scale(s, cfg=ROW), cfg=GPTQConfig()),
    "convrot_rtn": lambda s: round_to_nearest(absmax_scale(_rot(s), cfg=ROW)),
    "convrot_rtn+search": lambda s: scale_search(absmax_scale(_rot(s.__class__.from_weight(
        s.name, s.weight, bias=s.bias, meta=s.meta)), cfg=ROW), cfg=ScaleSearchConfig()),
    "quip": lambda s: ldlq(absmax_scale(_rot(s), cfg=ROW), cfg=LDLQ_ACT),
    "quip+w8a8": lambda s: w8a8_round(absmax_scale(_rot(s), cfg=ROW), cfg=W8A8RoundConfig(rounder=LDLQ_ACT)),
    "quip+w8a8r": lambda s: w8a8_round(absmax_scale(_rot(s), cfg=ROW),
                                       cfg=W8A8RoundConfig(rounder=LDLQ_ACT, ridge=0.01)),
    "quip+w8a8full": lambda s: w8a8_round(absmax_scale(_rot(s), cfg=ROW),
                                          cfg=W8A8RoundConfig(mix=1.0, ridge=0.1, rounder=LDLQ_ACT)),
    "quip+w8a8half": lambda s: w8a8_round(absmax_scale(_rot(s), cfg=ROW),
                                          cfg=W8A8RoundConfig(mix=0.5, ridge=0.01, rounder=LDLQ_ACT)),
    "quip+search": lambda s: scale_search(absmax_scale(_rot(s), cfg=ROW), cfg=ScaleSearchConfig(rounder=LDLQ_ACT)),
    "quip+bias": lambda s: bias_correction(RECIPES["quip"](s), cfg=BiasCorrectionConfig()),
    "quip+w8a8+search": lambda s: w8a8_round(absmax_scale(_rot(s), cfg=ROW), cfg=W8A8RoundConfig(
        rounder=LDLQ_ACT, scale_search=ScaleSearchConfig())),
    "quip+w8a8+bias": lambda s: bias_correction(RECIPES["quip+w8a8"](s)),
    "quip+all": lambda s: bias_correction(RECIPES["quip+w8a8+search"](s)),
    # scales chosen by weight MSE (round to nearest), then LDLQ with the calibration Hessian
    "quip+msesearch": lambda s: ldlq(scale_search(absmax_scale(_rot(s), cfg=ROW),
                                                  cfg=ScaleSearchConfig(objective="mse")), cfg=LDLQ_ACT),
    "quip+hsearch_rtn": lambda s: ldlq(scale_search(absmax_scale(_rot(s), cfg=ROW),
                                                    cfg=ScaleSearchConfig(objective="hessian")), cfg=LDLQ_ACT),
}
def _shrunk(s, beta):
    """Shrink the calibration Hessian towards its diagonal (original basis): (1 − β)·H + β·diag(H)."""
    return shrink_hessian(s, cfg=HessianShrinkConfig(beta))


def _kt_damp(s, c):
    t = int(s.meta.get("calibration", {}).get("samples", 0)) or 10 ** 9
    return attrs.evolve(LDLQ_ACT, damping=DampingConfig(percdamp=c * s.shape[1] / t))


DENSE_GRID = tuple(round(1 - 0.0025 * i, 4) for i in range(20)) + (0.93, 0.9, 0.85, 0.8)
RECIPES["convrot_rtn+search20"] = lambda s: scale_search(absmax_scale(_rot(LayerState.from_weight(
    s.name, s.weight, bias=s.bias, meta=s.meta)), cfg=ROW), cfg=ScaleSearchConfig(grid=DENSE_GRID))
RECIPES["quip@s0.3+search"] = lambda s: scale_search(absmax_scale(_rot(_shrunk(s, 0.3)), cfg=ROW),
                                                     cfg=ScaleSearchConfig(rounder=LDLQ_ACT))
RECIPES["rtn+search"] = lambda s: scale_search(absmax_scale(LayerState.from_weight(
    s.name, s.weight, bias=s.bias, meta=s.meta), cfg=ROW), cfg=ScaleSearchConfig())
RECIPES["gptq@s0.3"] = lambda s: gptq_update(absmax_scale(_shrunk(s, 0.3), cfg=ROW), cfg=GPTQConfig())
RECIPES["quip@s0.3+w8a8"] = lambda s: w8a8_round(absmax_scale(_rot(_shrunk(s, 0.3)), cfg=ROW),
                                                 cfg=W8A8RoundConfig(rounder=LDLQ_ACT))
for _b in (0.1, 0.2, 0.3, 0.5, 0.7):
    RECIPES[f"quip@s{_b}"] = (lambda b: lambda s: ldlq(absmax_scale(_rot(_shrunk(s, b)), cfg=ROW), cfg=LDLQ_ACT))(_b)
    RECIPES[f"quip@s{_b}+bias"] = (lambda b: lambda s: bias_correction(RECIPES[f"quip@s{b}"](s)))(_b)
    RECIPES[f"quip@s{_b}+msesearch"] = (lambda b: lambda s: ldlq(scale_search(absmax_scale(_rot(_shrunk(s, b)), cfg=ROW),
                                                                        cfg=ScaleSearchConfig(objective="mse")),
                                                                cfg=LDLQ_ACT))(_b)
    RECIPES[f"quip@s{_b}d0.1"] = (lambda b: lambda s: ldlq(absmax_scale(_rot(_shrunk(s, b)), cfg=ROW), cfg=attrs.evolve(
        LDLQ_ACT, damping=DampingConfig(percdamp=0.1))))(_b)
RECIPES["quip@auto"] = lambda s: ldlq(absmax_scale(_rot(shrink_hessian(s, cfg=HessianShrinkConfig("auto"))), cfg=ROW),
                                     cfg=LDLQ_ACT)
for _c in (0.1, 0.3):
    RECIPES[f"quip@kt{_c}"] = (lambda c: lambda s: ldlq(absmax_scale(_rot(s), cfg=ROW), cfg=_kt_damp(s, c)))(_c)
RECIPES["quip@d0.1+bias"] = lambda s: bias_correction(RECIPES["quip@d0.1"](s))
RECIPES["quip@d0.1+msesearch+bias"] = lambda s: bias_correction(ldlq(scale_search(
    absmax_scale(_rot(s), cfg=ROW), cfg=ScaleSearchConfig(objective="mse")), cfg=attrs.evolve(
    LDLQ_ACT, damping=DampingConfig(percdamp=0.1))))
for _d in (0.03, 0.1, 0.3, 1.0):
    RECIPES[f"quip@d{_d}"] = (lambda d: lambda s: ldlq(absmax_scale(_rot(s), cfg=ROW), cfg=attrs.evolve(
        LDLQ_ACT, damping=DampingConfig(percdamp=d))))(_d)


def _sequential_recipes():
    """Recipes that need their own calibration pass: ``capture_sequential`` with the recipe itself."""
    from cq.recipes import GPTQ, QuIP
    from cq.transforms.quip import QuIPConfig

    return {
        # the defaults as shipped (Hessian shrink 0.3, upstream correction 0.5) on a sequential file
        "quip+seq": QuIP(),
        "gptq+seq": GPTQ(),
        # the same file without the correction: only the Hessian of the partly quantized model
        "quip+seq(no upstream)": QuIP(QuIPConfig(upstream_strength=0.0)),
        "quip+seq(upstream 1.0)": QuIP(QuIPConfig(upstream_strength=1.0)),
    }


SEQUENTIAL = _sequential_recipes()
for _name in SEQUENTIAL:
    RECIPES[_name] = None  # run by run_minilm with its own sequential capture


#: The rows of the published table: today's recipes, each new piece alone on top of ConvRot + LDLQ
#: (``quip``), and the recommended defaults (``quip@s0.3`` with data, ``convrot_rtn+search`` without).
DEFAULT_RECIPES = ("rtn", "rtn+search", "gptq", "gptq@s0.3", "convrot_rtn", "convrot_rtn+search", "convrot_rtn+search20", "quip",
                   "quip+w8a8", "quip+search", "quip+bias", "quip@d0.1", "quip@s0.2", "quip@s0.3",
                   "quip@s0.3+bias", "quip@s0.3+w8a8", "quip+seq(no upstream)", "quip+seq", "gptq+seq")


class FloorLinear(torch.nn.Module):
    """Exact float weights through ComfyUI's activation path (rotate, per-token int8, dequantize)."""

    def __init__(self, weight, bias, rotation):
        super().__init__()
        self.rotation = rotation
        self.w = weight.detach().to(torch.float32) if rotation is None else rotation.rotate(weight.detach().float())
        self.b = None if bias is None else bias.detach().clone()

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1]).float()
        xw = self.rotation.rotate(x2) if self.rotation is not None else x2
        q, s = quantize_activations_ref(xw)
        y = (q.float() * s) @ self.w.t()
        if self.b is not None:
            y = y + self.b
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def _groupsize_rot(k):
    g = next((g for g in (256, 64, 16) if k % g == 0), 0)
    return ConvRot(g) if g else None


# ---------------------------------------------------------------------------------------------- MiniLM


def run_minilm(recipes, *, calib_n=None, swap=False, extra_calib=0, extra_heldout=0):
    import minilm_gptq as M

    if swap:  # calibrate on the 32 held-out sentences, judge on the 64 calibration ones
        M = types.SimpleNamespace(**{k: getattr(M, k) for k in ("load_model", "embed", "_linears", "W8A8Linear")},
                                  CALIBRATION_SENTENCES=M.HELDOUT_SENTENCES, HELDOUT_SENTENCES=M.CALIBRATION_SENTENCES)
    tokenizer, model = M.load_model()
    calib = M.CALIBRATION_SENTENCES[:calib_n] if calib_n else M.CALIBRATION_SENTENCES
    if extra_calib:
        if swap:
            raise SystemExit("--extra-calib adds calibration sentences; it cannot be combined with --swap")
        from minilm_extra_sentences import EXTRA_SENTENCES

        calib = list(calib) + EXTRA_SENTENCES[:extra_calib]
    heldout = list(M.HELDOUT_SENTENCES)
    if extra_heldout:
        from minilm_extra_sentences import EXTRA_SENTENCES

        if swap:
            raise SystemExit("--extra-heldout adds judging sentences; it cannot be combined with --swap")
        if extra_calib + extra_heldout > len(EXTRA_SENTENCES):
            raise SystemExit(f"--extra-calib {extra_calib} + --extra-heldout {extra_heldout} would share sentences: "
                             f"there are {len(EXTRA_SENTENCES)} extra sentences; keep the sum at most that")
        # the *last* N, so calibration (the first ones) and judging never share a sentence
        heldout += EXTRA_SENTENCES[len(EXTRA_SENTENCES) - extra_heldout:]
    batches = [tokenizer(calib[i:i + 16], padding=True, truncation=True, return_tensors="pt")
               for i in range(0, len(calib), 16)]
    t0 = time.perf_counter()
    stats = capture(model, batches, w8a8=("none", "auto"), token_mask="attention_mask")
    cap_s = time.perf_counter() - t0
    ref = M.embed(model, tokenizer, heldout)
    linears = M._linears(model)

    def one_minus_cos(qm):
        return float(1 - (M.embed(qm, tokenizer, heldout) * ref).sum(-1).mean())

    def swap(builder):
        qm = copy.deepcopy(model)
        for name, mod in M._linears(qm):
            parent_name, _, child = name.rpartition(".")
            parent = qm.get_submodule(parent_name) if parent_name else qm
            setattr(parent, child, builder(name, mod))
        return qm

    rows = []
    for label, rot in (("floor (no rotation)", False), ("floor (ConvRot)", True)):
        qm = swap(lambda name, mod: FloorLinear(mod.weight, mod.bias, _groupsize_rot(mod.in_features) if rot else None))
        rows.append({"recipe": label, "w8": float("nan"), "w8a8": one_minus_cos(qm), "s_layer": 0.0})
    for name in recipes:
        if name in SEQUENTIAL:
            from cq.recipes import recipe_pipeline
            from cq.sequential import capture_sequential
            from cq.transforms.attach import LayerData, attach_data

            t1 = time.perf_counter()
            seq = capture_sequential(model, batches, quantize=SEQUENTIAL[name], token_mask="attention_mask")
            cap = time.perf_counter() - t1
            body = recipe_pipeline(SEQUENTIAL[name])
            states = {}
            t1 = time.perf_counter()
            for lname, mod in linears:
                st = seq[lname]
                data = LayerData(hessian=st.hessian, upstream=st.upstream,
                                 stats={"input_mean": st.input_mean, "samples": st.samples})
                states[lname] = body(attach_data(LayerState.from_weight(
                    lname, mod.weight.detach(), bias=None if mod.bias is None else mod.bias.detach()), cfg=data))
            secs = (time.perf_counter() - t1) / len(linears)
            print(f"  minilm {name}: sequential capture {cap:.1f} s", file=sys.stderr)
        else:
            states = _states(RECIPES[name], linears, stats)
            secs = states.pop("_secs")
        rows.append(_minilm_row(name, states, secs, model, swap, one_minus_cos, M, linears))
    return {"rows": rows, "capture_s": cap_s, "layers": len(linears), "calib": len(calib), "heldout": len(heldout)}


def _states(fn, linears, stats):
    states = {}
    t1 = time.perf_counter()
    for lname, mod in linears:
        st = stats[lname]
        s = LayerState.from_weight(lname, mod.weight.detach(), bias=None if mod.bias is None else mod.bias.detach(),
                                   hessian=st.hessian,
                                   meta={"calibration": {"input_mean": st.input_mean, "samples": st.samples},
                                         "w8a8_stats": st.w8a8})
        states[lname] = fn(s)
    states["_secs"] = (time.perf_counter() - t1) / len(linears)
    return states


def _minilm_row(name, states, secs, model, swap, one_minus_cos, M, linears):
    def w8(lname, mod):
        lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(reconstruct(states[lname]))
            if mod.bias is not None:
                lin.bias.copy_(states[lname].bias)
        return lin

    def w8a8(lname, mod):
        s = states[lname]
        return M.W8A8Linear(s.codes, s.scale, s.bias, s.basis)

    row = {"recipe": name, "w8": one_minus_cos(swap(w8)), "w8a8": one_minus_cos(swap(w8a8)), "s_layer": secs}
    print(f"  minilm {name}: W8 {row['w8']:.3e}  W8A8 {row['w8a8']:.3e}  {secs:.3f} s/layer", file=sys.stderr)
    return row


# ---------------------------------------------------------------------------------------------- DiT-like

DIT_SHAPES = ((1536, 512), (512, 512), (2048, 512), (512, 2048), (3072, 512), (512, 512))


def run_dit(recipes, *, tokens=2048, shapes=DIT_SHAPES):
    layers = []
    for i, (n, k) in enumerate(shapes):
        w, x, _ = outlier_layer(n, k, 2 * tokens, seed=100 + i)
        xc, xh = x[:tokens], x[tokens:]
        h = (2.0 / tokens) * (xc.double().T @ xc.double())
        g = _groupsize_rot(k).groupsize
        w8 = {0: activation_stats(xc, groupsize=0), g: activation_stats(xc, groupsize=g)}
        layers.append((f"dit.{i}", w, h.float(), xc.mean(0), w8, xh))

    def err(y, ref):
        return float((y - ref).norm() / ref.norm())

    rows = []
    floors = {"floor (no rotation)": [], "floor (ConvRot)": []}
    for _, w, _, _, _, xh in layers:
        ref = xh @ w.t()
        for label, rot in (("floor (no rotation)", None), ("floor (ConvRot)", _groupsize_rot(w.shape[1]))):
            xw = rot.rotate(xh) if rot is not None else xh
            q, s = quantize_activations_ref(xw)
            ww = rot.rotate(w) if rot is not None else w
            floors[label].append(err((q.float() * s) @ ww.t(), ref))
    per = {}
    for name in recipes:
        if name in SEQUENTIAL:  # independent synthetic layers: there is no earlier layer to compensate
            continue
        e8, e88 = [], []
        t1 = time.perf_counter()
        for lname, w, h, mu, w8, xh in layers:
            s = LayerState.from_weight(lname, w, hessian=h, meta={"calibration": {"input_mean": mu, "samples": tokens},
                                                                  "w8a8_stats": w8})
            out = RECIPES[name](s)
            ref = xh @ w.t()
            e8.append(err(xh @ reconstruct(out).t(), ref))
            xr = out.basis.rotate(xh) if out.basis is not None else xh
            e88.append(err(int8_linear(xr, out.codes, out.scale, None), ref))
        secs = (time.perf_counter() - t1) / len(layers)
        per[name] = e88
        rows.append({"recipe": name, "w8": statistics.median(e8), "w8a8": statistics.median(e88), "s_layer": secs})
        print(f"  dit {name}: W8 {rows[-1]['w8']:.4e}  W8A8 {rows[-1]['w8a8']:.4e}  {secs:.3f} s/layer", file=sys.stderr)
    rtn = per.get("rtn")
    for label, vals in floors.items():
        rows.insert(0 if "no rot" in label else 1, {"recipe": label, "w8": float("nan"), "w8a8": statistics.median(vals),
                                                     "s_layer": 0.0, "_per": vals})
    for r in rows:
        vals = per.get(r["recipe"], r.get("_per"))
        r["vs_rtn"] = (statistics.median(a / b for a, b in zip(vals, rtn)) if rtn and vals else float("nan"))
    return {"rows": rows, "layers": len(layers), "tokens": tokens}


def _db(rel):
    return float("nan") if not rel == rel else (math.inf if rel == 0 else -20 * math.log10(rel))


def _gap_closed(rows):
    """``row -> "+x %"``: the share of the W8A8 gap between ``quip`` and the ConvRot floor a row closes."""
    floor = next(r["w8a8"] for r in rows if r["recipe"] == "floor (ConvRot)")
    quip = next((r["w8a8"] for r in rows if r["recipe"] == "quip"), None)

    def closed(r):
        if quip is None or r["recipe"].startswith("floor"):
            return ""
        return f"{(quip - r['w8a8']) / (quip - floor) * 100:+.0f} %"

    return closed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("minilm", "dit"), default=None)
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                    help="comma-separated (default: the table's rows), from: " + ", ".join(RECIPES))
    ap.add_argument("--tokens", type=int, default=2048, help="DiT-like calibration (= held-out) tokens per layer")
    ap.add_argument("--calib-n", type=int, default=None,
                    help="MiniLM: calibrate on only the first N calibration sentences (the data-size curve)")
    ap.add_argument("--extra-calib", type=int, default=0,
                    help="MiniLM: add the first N of scripts/minilm_extra_sentences.py to the calibration sentences")
    ap.add_argument("--extra-heldout", type=int, default=0,
                    help="MiniLM: judge also on the last N of scripts/minilm_extra_sentences.py (a steadier mean; "
                         "never shared with --extra-calib)")
    ap.add_argument("--swap", action="store_true",
                    help="MiniLM: calibrate on the held-out sentences and judge on the calibration ones")
    args = ap.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    torch.manual_seed(0)
    if args.only in (None, "minilm"):
        res = run_minilm(recipes, swap=args.swap, calib_n=args.calib_n, extra_calib=args.extra_calib,
                         extra_heldout=args.extra_heldout)
        print(f"\nMiniLM-L6: {res['layers']} Linears, calibrated on {res['calib']} sentences (capture with W8A8 "
              f"statistics {res['capture_s']:.1f} s), mean 1 − cos on {res['heldout']} held-out sentences\n")
        closed_of = _gap_closed(res["rows"])
        print("| recipe | W8 1−cos | W8A8 1−cos | W8A8 gap to ConvRot floor closed vs quip | s/layer |")
        print("|---|---|---|---|---|")
        for r in res["rows"]:
            closed = closed_of(r)
            w8 = "—" if r["w8"] != r["w8"] else f"{r['w8']:.3e}"
            print(f"| {r['recipe']} | {w8} | {r['w8a8']:.3e} | {closed} | {r['s_layer']:.3f} |")
    if args.only in (None, "dit"):
        res = run_dit(recipes, tokens=args.tokens)
        print(f"\nDiT-like: {res['layers']} outlier layers, {res['tokens']} calibration + {res['tokens']} held-out "
              "tokens each; medians over layers\n")
        closed_of = _gap_closed(res["rows"])
        print("| recipe | W8 SQNR dB | W8A8 SQNR dB | W8A8 err / RTN | gap closed vs quip | s/layer |")
        print("|---|---|---|---|---|---|")
        for r in res["rows"]:
            closed = closed_of(r)
            w8 = "—" if r["w8"] != r["w8"] else f"{_db(r['w8']):.2f}"
            print(f"| {r['recipe']} | {w8} | {_db(r['w8a8']):.2f} | {r['vs_rtn']:.3f} | {closed} | {r['s_layer']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
