"""The record a conversion returns: per-layer format, scale shape, metrics and notes."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import attrs

__all__ = ["LayerReport", "ConversionReport"]


def _freeze(d: Mapping[str, Any] | None) -> dict:
    return dict(d or {})


@attrs.frozen(kw_only=True)
class LayerReport:
    """What happened to one tensor key (quantized layers carry their metrics)."""

    name: str  # layer stem for quantized layers, the tensor key otherwise
    action: str  # "quantize" | "keep" | "remove"
    reason: str = ""
    recipe: str | None = None  # the recipe record's type name (RTN, GPTQ, QuIP, FP16, yours), or "pipeline"
    source: str | None = None  # for weights read from quantized inputs: "decoded from float8_e4m3fn (...)"
    format: str | None = None
    shape: tuple[int, ...] = ()
    scale_shape: tuple[int, ...] | None = None
    metrics: dict = attrs.field(factory=dict, converter=_freeze)
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = attrs.asdict(self)
        d["metrics"] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                        for k, v in self.metrics.items()}
        return d


@attrs.frozen(kw_only=True)
class ConversionReport:
    """The result of :func:`cq.convert_to_int8` / :func:`cq.convert.convert_file`.

    ``layers`` lists every quantized layer (and, with ``include_kept``, the kept ones) in file order.
    """

    input_file: str
    output_file: str
    layers: tuple[LayerReport, ...]
    kept: int = 0
    removed: int = 0
    seconds: float = 0.0
    quality_threshold: float = 30.0
    notes: tuple[str, ...] = ()
    model: dict = attrs.field(factory=dict, converter=_freeze)  # model-level transforms' reports (e.g. "lora")
    device: str = "cpu"

    @property
    def converted(self) -> tuple[LayerReport, ...]:
        """Every layer a pipeline ran on: the int8 layers and those stored as float16."""
        return tuple(r for r in self.layers if r.action == "quantize")

    @property
    def quantized(self) -> tuple[LayerReport, ...]:
        """The layers stored quantized; an fp16 cast is not quantization and is counted apart."""
        return tuple(r for r in self.converted if r.format != "fp16")

    @property
    def fp16(self) -> tuple[LayerReport, ...]:
        """The layers stored as float16 (``--fp16``, ``--fallback fp16``, ``custom_type fp16``)."""
        return tuple(r for r in self.converted if r.format == "fp16")

    @property
    def mean_sqnr_db(self) -> float:
        vals = [r.metrics["sqnr_db"] for r in self.quantized
                if "sqnr_db" in r.metrics and math.isfinite(r.metrics["sqnr_db"])]
        return sum(vals) / len(vals) if vals else math.nan

    @property
    def below_threshold(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.quantized if r.metrics.get("sqnr_db", math.inf) < self.quality_threshold)

    def to_dict(self) -> dict:
        return {
            "input_file": self.input_file,
            "output_file": self.output_file,
            "seconds": self.seconds,
            "kept": self.kept,
            "removed": self.removed,
            "quantized": len(self.quantized),
            "fp16": len(self.fp16),
            "mean_sqnr_db": None if math.isnan(self.mean_sqnr_db) else self.mean_sqnr_db,
            "below_threshold": list(self.below_threshold),
            "notes": list(self.notes),
            "device": self.device,
            "model": self.model,
            "layers": [r.to_dict() for r in self.layers],
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        """A fixed-width per-layer table (the CLI's final output)."""
        cols = [("layer", 44), ("format", 16), ("scale", 10), ("SQNR dB", 8), ("out err", 8), ("W8A8 err", 9),
                ("pred", 8), ("RTN", 8)]
        head = " ".join(f"{c:<{w}}" if i < 3 else f"{c:>{w}}" for i, (c, w) in enumerate(cols))
        lines = [head, "-" * len(head)]

        def num(v, fmt, exact_ok=False):
            # A non-finite error or prediction (no signal, a failed factorization) means nothing; only
            # an SQNR of +inf does (the layer is exact).
            ok = isinstance(v, (int, float)) and (math.isfinite(v) or (exact_ok and v == math.inf))
            return format(v, fmt) if ok else f"{'-':>{int(fmt.split('.')[0])}}"

        for r in self.converted:
            m = r.metrics
            out = m.get("rel_out_h", m.get("rel_out_x"))
            name = r.name if len(r.name) <= 44 else "…" + r.name[-43:]
            scale = "x".join(map(str, r.scale_shape)) if r.scale_shape else ("()" if r.scale_shape == () else "-")
            lines.append(
                f"{name:<44} {r.format or '-':<16} {scale:<10} {num(m.get('sqnr_db'), '8.2f', True)} "
                f"{num(out, '8.5f')} {num(m.get('w8a8'), '9.5f')} {num(m.get('predicted_rel_out'), '8.5f')} "
                f"{num(m.get('rel_out_rtn_h'), '8.5f')}"
            )
        lines.append("-" * len(head))
        fp16 = f", {len(self.fp16)} stored as fp16" if self.fp16 else ""
        # With no finite SQNR there is no mean to show: say so instead of printing "nan dB".
        mean = self.mean_sqnr_db
        mean_txt = f"mean SQNR {mean:.2f} dB" if math.isfinite(mean) else "mean SQNR -"
        lines.append(f"{len(self.quantized)} layers quantized{fp16}, {self.kept} tensors kept, {self.removed} removed, "
                     f"{mean_txt}, {len(self.below_threshold)} below {self.quality_threshold:g} dB, "
                     f"{self.seconds:.1f} s")
        return "\n".join(lines)
