"""One self-contained HTML page from a :class:`~cq.report.ConversionReport` (``--report-html PATH``).

Charts are drawn by matplotlib (the optional extra ``pip install cq[report]``) as SVG and embedded
as ``data:`` URIs, so the page has no external reference: per-layer weight SQNR and the runtime's
quantized-activation error (W8A8 for int8, fp8 activations for FP8) in model order, coloured by
format and recipe; predicted against achieved output error for GPTQ/LDLQ layers; then tables of
the kept layers and why, the layers decoded from fp8/int8 inputs, the settings and the timing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from typing import Any, Mapping

from .errors import ConfigError
from .report import ConversionReport, LayerReport

__all__ = ["render_html_report", "write_html_report", "layer_label"]

#: At most this many layer names are printed under a bar chart (beyond it the axis is an index).
_MAX_TICK_LABELS = 120


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"the HTML report needs matplotlib ({e}); install it with `pip install cq[report]` "
                          "or `pip install matplotlib`") from e
    matplotlib.use("Agg", force=True)  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def layer_label(r: LayerReport) -> str:
    """The legend group of a converted layer: ``format`` plus the recipe when one is recorded.

    Example:
        >>> layer_label(LayerReport(name="a", action="quantize", format="int8_tensorwise", recipe="GPTQ"))
        'int8_tensorwise · GPTQ'
    """
    fmt = r.format or "?"
    return f"{fmt} · {r.recipe}" if r.recipe else fmt


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _svg_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(labels: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {lab: cmap(i % 10) for i, lab in enumerate(dict.fromkeys(labels))}


def _bar_chart(plt, layers: list[LayerReport], values: list[float], *, ylabel: str, title: str,
               hline: float | None = None, log: bool = False) -> str:
    labels = [layer_label(r) for r in layers]
    colors = _colors(labels)
    n = len(layers)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.18 * n + 2), 28.0), 4.2))
    xs = range(n)
    ax.bar(xs, values, color=[colors[lab] for lab in labels], width=0.85)
    if hline is not None:
        ax.axhline(hline, color="#c0392b", linestyle="--", linewidth=1, label=f"threshold {hline:g}")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if n <= _MAX_TICK_LABELS:
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r.name for r in layers], rotation=90, fontsize=6)
    else:
        ax.set_xlabel(f"layer index in model order ({n} layers)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    names = list(colors)
    if hline is not None:
        handles.append(ax.get_lines()[0])
        names.append(f"threshold {hline:g}")
    ax.legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))  # never over the bars
    ax.margins(x=0.005)
    uri = _svg_uri(fig)
    plt.close(fig)
    return uri


def _scatter_pred(plt, layers: list[LayerReport]) -> str | None:
    pts = [(r.metrics["predicted_rel_out"], r.metrics.get("rel_out_h", r.metrics.get("rel_out_x")), r)
           for r in layers if _finite(r.metrics.get("predicted_rel_out"))
           and _finite(r.metrics.get("rel_out_h", r.metrics.get("rel_out_x")))]
    if not pts:
        return None
    colors = _colors([layer_label(r) for _, _, r in pts])
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for lab, c in colors.items():
        xy = [(p, a) for p, a, r in pts if layer_label(r) == lab]
        ax.scatter([p for p, _ in xy], [a for _, a in xy], color=c, s=14, label=lab)
    lo = min(min(p, a) for p, a, _ in pts)
    hi = max(max(p, a) for p, a, _ in pts)
    ax.plot([lo, hi], [lo, hi], color="#555", linewidth=1, linestyle=":", label="achieved = predicted")
    ax.set_xlabel("predicted relative output error")
    ax.set_ylabel("achieved relative output error")
    ax.set_title("GPTQ / LDLQ: predicted vs achieved")
    if lo > 0:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    uri = _svg_uri(fig)
    plt.close(fig)
    return uri


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if _finite(v) else "–"


def _table(headers: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}h2{font-size:1.1em;
margin-top:1.6em}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:left}th{background:#f3f3f3}img{max-width:100%;display:block;margin:.5em 0}.summary td:first-child{
font-weight:600}.bad{color:#c0392b;font-weight:600}"""


def render_html_report(report: ConversionReport, *, settings: Mapping[str, Any] | None = None,
                       detection: Any = None, title: str | None = None) -> str:
    """The report as one HTML document (a string).

    ``settings``: the run's options, shown as a table (e.g. the converter config as a dict);
    ``detection``: a :class:`cq.detect.Detection` to show what architecture was recognised and why.

    Raises:
        ImportError: matplotlib is missing (``pip install cq[report]``).

    Example:
        >>> from cq.report import ConversionReport, LayerReport
        >>> r = ConversionReport(input_file="in.safetensors", output_file="out.safetensors", layers=(
        ...     LayerReport(name="blk.0.fc", action="quantize", format="int8_tensorwise", recipe="RTN",
        ...                 metrics={"sqnr_db": 38.2, "w8a8": 0.012}),
        ...     LayerReport(name="final.weight", action="keep", reason="preset flux2: final_layer")))
        >>> page = render_html_report(r)
        >>> page.startswith("<!DOCTYPE html>"), page.count("<img"), "preset flux2: final_layer" in page
        (True, 2, True)
    """
    if not isinstance(report, ConversionReport):
        raise ConfigError(f"render_html_report needs a cq.report.ConversionReport, got {type(report).__name__}")
    plt = _pyplot()
    conv = list(report.converted)
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{e(title or 'cq conversion report')}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(title or 'cq conversion report')}</h1>"]

    mean = report.mean_sqnr_db
    summary = [["input", e(report.input_file)], ["output", e(report.output_file)],
               ["layers quantized", str(len(report.quantized))], ["stored as fp16", str(len(report.fp16))],
               ["tensors kept", str(report.kept)], ["tensors removed", str(report.removed)],
               ["mean SQNR", f"{mean:.2f} dB" if math.isfinite(mean) else "–"],
               [f"below {report.quality_threshold:g} dB", f'<span class="{"bad" if report.below_threshold else ""}">'
                f"{len(report.below_threshold)}</span>"],
               ["time", f"{report.seconds:.1f} s total, {sum(r.seconds for r in report.layers):.1f} s in layer "
                        f"pipelines, device {e(str(report.device))}"]]
    parts.append("<h2>Summary</h2>" + _table(["", ""], summary, "summary"))

    if detection is None and report.model.get("detection"):  # what the runner recognised
        from .detect import Detection

        d = report.model["detection"]
        detection = Detection(d.get("family"), tuple(d.get("presets", ())), tuple(d.get("evidence", ())))
    if detection is not None:
        lines = e(detection.describe()).replace("\n", "<br>")
        parts.append(f"<h2>Architecture</h2><p>{lines}</p>")

    measured = [r for r in conv if _finite(r.metrics.get("sqnr_db"))]
    if measured:
        parts.append("<h2>Weight SQNR per layer (model order)</h2>")
        parts.append(f'<img alt="weight SQNR per layer" src="{_bar_chart(plt, measured, [r.metrics["sqnr_db"] for r in measured], ylabel="SQNR (dB)", title="weight SQNR", hline=report.quality_threshold)}">')
    act = [r for r in conv if _finite(r.metrics.get("w8a8"))]
    if act:
        parts.append("<h2>Runtime output error per layer (quantized activations: W8A8 for int8, fp8 for FP8)</h2>")
        parts.append(f'<img alt="runtime output error per layer" src="{_bar_chart(plt, act, [max(r.metrics["w8a8"], 1e-12) for r in act], ylabel="relative output error", title="runtime (quantized-activation) output error", log=True)}">')
    pred = _scatter_pred(plt, conv)
    if pred:
        parts.append("<h2>Predicted vs achieved output error (GPTQ / LDLQ)</h2>")
        parts.append(f'<img alt="predicted vs achieved output error" src="{pred}">')

    kept = [r for r in report.layers if r.action in ("keep", "remove")]
    if kept or report.fp16:
        rows = [[e(r.name), e(r.action), e(r.reason or "–")] for r in kept]
        rows += [[e(r.name), "fp16", e(r.reason or "stored as float16")] for r in report.fp16]
        parts.append("<h2>Layers kept in high precision, and why</h2>" + _table(["tensor", "action", "reason"], rows, "kept"))

    decoded = [(r, r.source) for r in report.layers if r.source]
    if decoded:
        parts.append("<h2>Layers read from quantized inputs</h2>" + _table(
            ["layer", "source"], [[e(r.name), e(n)] for r, n in decoded], "decoded"))

    if conv:
        rows = []
        for r in conv:
            m = r.metrics
            scale = "×".join(map(str, r.scale_shape)) if r.scale_shape else ("()" if r.scale_shape == () else "–")
            rows.append([e(r.name), e(r.format or "–"), e(r.recipe or "–"), e(scale), _num(m.get("sqnr_db"), ".2f"),
                         _num(m.get("rel_out_h", m.get("rel_out_x")), ".5f"), _num(m.get("w8a8"), ".5f"),
                         _num(m.get("predicted_rel_out"), ".5f"), f"{r.seconds:.2f}", e("; ".join(r.notes))])
        parts.append("<h2>Every converted layer</h2>" + _table(
            ["layer", "format", "recipe", "scale", "SQNR dB", "out err", "runtime err", "predicted", "s", "notes"],
            rows, "layers"))

    if settings:
        parts.append("<h2>Settings</h2>" + _table(["option", "value"], [[e(str(k)), e(repr(v))] for k, v in settings.items()], "settings"))
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html_report(report: ConversionReport, path: str | os.PathLike, **kwargs) -> str:
    """Write :func:`render_html_report` to ``path`` atomically; returns the path written."""
    from .io.writer import write_text_atomic

    page = render_html_report(report, **kwargs)
    write_text_atomic(path, page)
    return os.fspath(path)
