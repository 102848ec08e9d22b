"""SmoothQuant on a real post-LN encoder: MiniLM (all-MiniLM-L6-v2), V → attention-output folds only.

In BERT/MiniLM a LayerNorm output is also the residual stream, so folding a factor into it is not
exact; cq folds only V → ``attention.output.dense`` there (``find_folds`` finds nothing else). This
script captures Hessians on the calibration sentences (``scripts/minilm_gptq.py``'s), runs
:func:`cq.transforms.smoothquant.smoothquant` with the ConvRot group the QuIP recipe uses, checks
that the smoothed float model gives the same embeddings, and reports mean 1−cos of held-out
sentence embeddings against the float model for ComfyUI's W8A8 forward (per-token int8
activations after ConvRot): the activation-only floor (exact weights) and ConvRot + LDLQ (cq's
QuIP output, Hessians recaptured on the smoothed model), each without and with smoothing.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/minilm_smoothquant.py
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

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minilm_gptq import CALIBRATION_SENTENCES, HELDOUT_SENTENCES, embed, load_model  # noqa: E402

from cq.calibrate import capture  # noqa: E402
from cq.model import DictView  # noqa: E402
from cq.state import LayerState  # noqa: E402
from cq.transforms.hadamard import regular_hadamard  # noqa: E402
from cq.transforms.quip import QuIPConfig, quip_pipeline  # noqa: E402
from cq.transforms.rounding import working_dequantized  # noqa: E402
from cq.transforms.smoothquant import SmoothQuantConfig, smoothquant  # noqa: E402

GROUP = 64  # cq's "auto" ConvRot group for K = 384 and 1536 (the largest power of 4 dividing both)


def _rot(x: torch.Tensor) -> torch.Tensor:
    r = regular_hadamard(GROUP, dtype=x.dtype)
    return (x.reshape(*x.shape[:-1], -1, GROUP) @ r).reshape(x.shape)


def _q_rows(m: torch.Tensor) -> torch.Tensor:
    s = m.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    return torch.clamp(torch.round(m / s), -127, 127) * s


class RotatedW8A8(torch.nn.Module):
    """Per-token int8 activations after ConvRot × a weight given in the rotated basis (float, as dequantized)."""

    def __init__(self, w_rot: torch.Tensor, bias):
        super().__init__()
        self.register_buffer("w", w_rot.float())
        self.bias = bias

    def forward(self, x):
        return torch.nn.functional.linear(_q_rows(_rot(x)), self.w, self.bias)


def quantized_copy(model, hessians, *, exact: bool):
    q = copy.deepcopy(model)
    for name, mod in list(q.named_modules()):
        if not isinstance(mod, torch.nn.Linear):
            continue
        if exact:
            w_rot = _rot(mod.weight.detach().to(torch.float64)).float()
        else:
            st = LayerState.from_weight(name, mod.weight.detach().float(), hessian=hessians[name].hessian)
            w_rot = working_dequantized(quip_pipeline(QuIPConfig(convrot_groupsize=GROUP))(st))
        parent, _, child = name.rpartition(".")
        setattr(q.get_submodule(parent) if parent else q, child, RotatedW8A8(w_rot, mod.bias))
    return q


def main() -> int:
    torch.manual_seed(0)
    tokenizer, model = load_model()
    batches = [tokenizer(CALIBRATION_SENTENCES[i:i + 16], padding=True, truncation=True, return_tensors="pt")
               for i in range(0, len(CALIBRATION_SENTENCES), 16)]
    hessians = capture(model, batches)
    reference = embed(model, tokenizer, HELDOUT_SENTENCES)
    t0 = time.perf_counter()
    edits = smoothquant(DictView(model.state_dict()), cfg=SmoothQuantConfig(calibration=hessians,
                                                                          convrot_groupsize=GROUP))
    t_sq = time.perf_counter() - t0
    smoothed = copy.deepcopy(model)
    sd = {k: edits.apply(k, v) for k, v in model.state_dict().items()}
    smoothed.load_state_dict(sd)
    hessians_s = capture(smoothed, batches)
    float_gap = float(1 - (embed(smoothed, tokenizer, HELDOUT_SENTENCES) * reference).sum(-1).mean())
    rep = edits.report["smoothquant"]
    print(f"MiniLM: folded {len(rep['folded'])} V -> O mappings in {t_sq:.1f} s; skipped {len(rep['skipped'])}; "
          f"smoothed float model 1-cos vs float: {float_gap:.1e}")
    print("alphas:", [f["alpha"] for f in rep["folded"]])
    print("\n| W8A8 recipe (ConvRot 64) | no smoothing | smoothquant (V → O) | change |")
    print("|---|---|---|---|")
    for label, exact in (("floor (exact weights)", True), ("ConvRot + LDLQ (quip)", False)):
        errs = []
        for m, h in ((model, hessians), (smoothed, hessians_s)):
            emb = embed(quantized_copy(m, h, exact=exact), tokenizer, HELDOUT_SENTENCES)
            errs.append(float(1 - (emb * reference).sum(-1).mean()))
        print(f"| {label} | {errs[0]:.3e} | {errs[1]:.3e} | {100 * (errs[1] / errs[0] - 1):+.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
