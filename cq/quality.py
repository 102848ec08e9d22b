"""Per-layer quality report (the reference's ``QualityReporter``) over cq's metrics.

The metrics are :mod:`cq.transforms.metrics`' (float64). One deliberate difference from the
reference: SQNR is the *power* ratio ``10·log10(Σw² / Σ(w−ŵ)²)``, not the variance ratio the
reference computed (which ignores any error in the mean); for weights with a near-zero mean the
two agree. The summary's mean SQNR leaves out layers with an infinite SQNR (exact layers) so that
one exact layer does not make the mean ``inf``; those are counted in ``exact_layers``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .transforms.metrics import max_error, mse, sqnr_db

__all__ = ["QualityReporter", "compute_mse", "compute_sqnr", "compute_max_error", "compute_quality_metrics"]


def compute_mse(original: torch.Tensor, quantized: torch.Tensor) -> float:
    """Mean squared error (see :func:`cq.transforms.metrics.mse`)."""
    return mse(original, quantized)


def compute_sqnr(original: torch.Tensor, quantized: torch.Tensor) -> float:
    """SQNR in dB, ``inf`` when exact (see :func:`cq.transforms.metrics.sqnr_db`).

    Example:
        >>> round(compute_sqnr(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.05])), 2)
        40.0
    """
    return sqnr_db(original, quantized)


def compute_max_error(original: torch.Tensor, quantized: torch.Tensor) -> float:
    """Largest absolute elementwise error."""
    return max_error(original, quantized)


def compute_quality_metrics(original: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    """``{"mse", "sqnr", "max_error"}`` of ``quantized`` (dequantized weights) against ``original``."""
    if tuple(original.shape) != tuple(quantized.shape):
        raise ValueError(f"original {list(original.shape)} and quantized {list(quantized.shape)} must have the "
                         "same shape; pass the dequantized weight, not the int8 codes with a scale")
    return {"mse": mse(original, quantized), "sqnr": sqnr_db(original, quantized),
            "max_error": max_error(original, quantized)}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


class QualityReporter:
    """Collects per-layer metrics and prints a table (``--report-quality``).

    ``layers`` (alias ``reports``) maps a layer name to its metrics: ``mse``, ``sqnr`` (dB),
    ``max_error`` and any ``extra_metrics`` given to :meth:`add_layer`. Adding a name again
    replaces its entry. ``summary`` holds ``mean_sqnr`` (over finite SQNRs), ``below_threshold``
    (layers with SQNR < ``threshold``), ``total_layers`` and ``exact_layers``.

    Example:
        >>> r = QualityReporter(threshold=30.0)
        >>> w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
        >>> r.add_layer("fc", w, w + 0.01, w8a8=0.02)
        >>> r.add_layer("exact", w, w)
        >>> s = r.summary
        >>> round(s["mean_sqnr"], 1), s["below_threshold"], s["total_layers"], s["exact_layers"]
        (47.3, 0, 2, 1)
    """

    def __init__(self, threshold: float = 30.0):
        self.threshold = float(threshold)
        self.layers: dict[str, dict[str, Any]] = {}

    @property
    def reports(self) -> dict[str, dict[str, Any]]:
        """The reference's name for :attr:`layers`."""
        return self.layers

    def add_layer(self, name: str, original: torch.Tensor, quantized: torch.Tensor, **extra_metrics: Any) -> None:
        """Record ``quantized`` (the dequantized weight) against ``original`` for layer ``name``."""
        try:
            metrics = compute_quality_metrics(original, quantized)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        metrics.update(extra_metrics)
        self.layers[name] = metrics

    @property
    def summary(self) -> dict[str, Any]:
        sqnrs = [m["sqnr"] for m in self.layers.values()]
        finite = [s for s in sqnrs if math.isfinite(s)]
        if finite:
            mean = math.fsum(finite) / len(finite)
        else:
            mean = math.inf if sqnrs else 0.0
        return {
            "mean_sqnr": mean,
            "below_threshold": sum(1 for s in sqnrs if s < self.threshold),
            "total_layers": len(sqnrs),
            "exact_layers": sum(1 for s in sqnrs if s == math.inf),
        }

    def as_dict(self) -> dict[str, Any]:
        """``{"threshold", "layers", "summary"}`` (JSON-ready apart from ``inf`` values)."""
        return {"threshold": self.threshold, "layers": {k: dict(v) for k, v in sorted(self.layers.items())},
                "summary": self.summary}

    def get_report_string(self) -> str:
        """A table sorted by layer name, then the summary."""
        if not self.layers:
            return "No quality metrics collected."
        extra = list(dict.fromkeys(k for m in self.layers.values() for k in m
                                   if k not in ("mse", "sqnr", "max_error")))
        headers = ["Layer", "MSE", "SQNR (dB)", "Max Error"] + extra
        rows = [[name, _fmt(m["mse"]),
                 "inf" if m["sqnr"] == math.inf else f"{m['sqnr']:.2f}", _fmt(m["max_error"])]
                + [_fmt(m.get(k, "")) for k in extra]
                for name, m in sorted(self.layers.items())]
        widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]

        def line(cells):
            return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        rule = "-" * len(line(headers))
        s = self.summary
        out = ["Quantization Quality Report:", line(headers), rule, *(line(r) for r in rows), rule, "Summary:",
               f"  Mean SQNR: {s['mean_sqnr']:.2f} dB"
               + (f" (over {s['total_layers'] - s['exact_layers']} layers; {s['exact_layers']} exact)"
                  if s["exact_layers"] else ""),
               f"  Layers below {self.threshold:g} dB: {s['below_threshold']} / {s['total_layers']}"]
        return "\n".join(out)
