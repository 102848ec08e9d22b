"""An example HTML report on MiniLM: INT8 RTN, INT8 GPTQ and FP8 layers mixed.

Usage: python scripts/report_html_example.py [OUT.html]   (default: report_example.html)
docs/report_example.png is this page rendered by WeasyPrint (a print renderer) to PDF, page 1 rasterized.
Attention projections: INT8 GPTQ (calibration Hessians, predicted vs achieved error); FFN layers: FP8
(float8_e4m3fn with a static input_scale from calibration absmax); the pooler: INT8 RTN; embeddings and
norms are kept (the reason a preset/the generic rule would give). Per-layer metrics use 64 input rows drawn
with the calibration second moments (cq.recipes.metrics_inputs), as a conversion does.
"""

from __future__ import annotations

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
from cq.recipes import measure_stage  # noqa: E402
from cq.report import ConversionReport, LayerReport  # noqa: E402
from cq.report_html import write_html_report  # noqa: E402
from cq.state import LayerState, PerRow  # noqa: E402
from cq.transforms import ScaleConfig, absmax_scale, round_to_nearest  # noqa: E402
from cq.transforms.fp8 import Fp8Config, fp8_measure_stage, fp8_pipeline  # noqa: E402
from cq.transforms.gptq import GPTQConfig, gptq_update  # noqa: E402
from minilm_gptq import CALIBRATION_SENTENCES, load_model  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else "report_example.html"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tokenizer, model = load_model()
    batches = [tokenizer(CALIBRATION_SENTENCES[i:i + 16], padding=True, truncation=True, return_tensors="pt")
               for i in range(0, len(CALIBRATION_SENTENCES), 16)]
    stats = capture(model, batches)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers = []
    for key, t in model.state_dict().items():
        stem = key[: -len(".weight")]
        if key.endswith(".bias") and key[: -len(".bias")] in linears:
            continue
        if stem not in linears:
            why = "norm (generic rule: norms stay in high precision)" if "LayerNorm" in key else \
                "embedding table (generic rule)" if "embeddings" in key else "not a Linear weight"
            layers.append(LayerReport(name=key, action="keep", reason=why, shape=tuple(t.shape)))
            continue
        t1 = time.perf_counter()
        h = stats[stem]
        st = LayerState.from_weight(stem, t.detach().float(), hessian=h.hessian,
                                    meta={"input_absmax": h.input_absmax})
        if "attention" in stem and "output" not in stem:
            st = gptq_update(absmax_scale(st, cfg=ScaleConfig(PerRow())), cfg=GPTQConfig())
            recipe = "GPTQ"
            st = measure_stage(st, 64, 0)(st)
        elif "intermediate" in stem or ("output.dense" in stem and "attention" not in stem):
            st = fp8_pipeline(Fp8Config(input_scale=True))(st)
            recipe = "FP8"
            st = fp8_measure_stage(st, 64, 0)(st)
        else:
            st = round_to_nearest(absmax_scale(st, cfg=ScaleConfig(PerRow())))
            recipe = "RTN"
            st = measure_stage(st, 64, 0)(st)
        layers.append(LayerReport(name=stem, action="quantize", recipe=recipe, format=st.format,
                                  shape=tuple(st.shape), scale_shape=tuple(st.scale.shape), metrics=dict(st.metrics),
                                  notes=tuple(st.notes), seconds=time.perf_counter() - t1))
    report = ConversionReport(input_file="all-MiniLM-L6-v2/model.safetensors", output_file="(example, not written)",
                              layers=tuple(layers), kept=sum(r.action == "keep" for r in layers),
                              seconds=time.perf_counter() - t0,
                              notes=(f"calibration: {len(CALIBRATION_SENTENCES)} sentences",))
    settings = {"attention q/k/v": "int8_tensorwise, GPTQ, per-row scales", "FFN": "float8_e4m3fn, static input_scale",
                "others": "int8_tensorwise, RTN", "metric rows": 64}
    from cq.detect import detect_architecture

    path = write_html_report(report, out, settings=settings, detection=detect_architecture(model.state_dict()),
                             title="cq report: MiniLM-L6 (example)")
    print(f"wrote {path}: {len(report.quantized)} layers, {report.kept} kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
