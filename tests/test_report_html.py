"""cq.report_html: the page is self-contained, parses, and shows every layer, chart and reason."""

from __future__ import annotations

import base64
import pathlib
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

pytest.importorskip("matplotlib")

from cq.detect import detect_architecture  # noqa: E402
from cq.report import ConversionReport, LayerReport  # noqa: E402
from cq.report_html import render_html_report, write_html_report  # noqa: E402


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.h2, self.links = [], {}, [], []
        self._table = self._row = self._cell = None
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag in ("script", "link", "iframe") or (tag == "a" and "href" in a):
            self.links.append((tag, a))
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("class"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "h2":
            self._in_h2 = True
            self.h2.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_h2:
            self.h2[-1] += data


def _report():
    layers = []
    for i in range(6):
        layers.append(LayerReport(name=f"blocks.{i}.attn.qkv", action="quantize", format="int8_tensorwise",
                                  recipe="GPTQ" if i % 2 else "RTN", shape=(64, 64), scale_shape=(64, 1),
                                  metrics={"sqnr_db": 36.0 + i, "w8a8": 0.012 + i / 1000, "rel_out_h": 0.01 + i / 500,
                                           **({"predicted_rel_out": 0.011 + i / 500} if i % 2 else {})}, seconds=0.1))
    layers.append(LayerReport(name="blocks.6.mlp", action="quantize", format="float8_e4m3fn", recipe="FP8",
                              shape=(64, 64), scale_shape=(), metrics={"sqnr_db": 31.0, "w8a8": 0.04, "rel_out_x": 0.03},
                              source="decoded from float8_e4m3fn (scaled_fp8)"))
    layers.append(LayerReport(name="final_layer.linear", action="quantize", format="fp16", reason="fallback fp16"))
    layers.append(LayerReport(name="img_in.weight", action="keep", reason="preset flux2: img_in"))
    layers.append(LayerReport(name="decoder.x.weight", action="remove", reason="preset t5xxl: decoder"))
    return ConversionReport(input_file="in <fp8>.safetensors", output_file="out.safetensors", layers=tuple(layers),
                            kept=1, removed=1, seconds=3.5, notes=("a run note",))


def test_page_parses_is_self_contained_and_complete(tmp_path):
    det = detect_architecture({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64)})
    path = write_html_report(_report(), tmp_path / "r.html", settings={"optimizer": "gptq", "fp8": False},
                             detection=det)
    text = pathlib.Path(path).read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    assert not page.links  # no scripts, stylesheets or links to fetch
    assert len(page.imgs) == 3  # SQNR bars, runtime-error bars, predicted-vs-achieved scatter
    for img in page.imgs:
        assert img["src"].startswith("data:image/svg+xml;base64,") and img.get("alt")
        svg = ET.fromstring(base64.b64decode(img["src"].split(",", 1)[1]))
        assert svg.tag.endswith("svg")
    rows = page.tables["layers"][1:]
    assert [r[0] for r in rows] == [f"blocks.{i}.attn.qkv" for i in range(6)] + ["blocks.6.mlp", "final_layer.linear"]
    assert rows[6][1] == "float8_e4m3fn" and rows[6][4] == "31.00"
    kept = {r[0]: r[2] for r in page.tables["kept"][1:]}
    assert kept["img_in.weight"] == "preset flux2: img_in" and kept["decoder.x.weight"] == "preset t5xxl: decoder"
    assert kept["final_layer.linear"] == "fallback fp16"
    assert page.tables["decoded"][1] == ["blocks.6.mlp", "decoded from float8_e4m3fn (scaled_fp8)"]
    assert {r[0] for r in page.tables["settings"][1:]} == {"optimizer", "fp8"}
    assert "in <fp8>.safetensors" in {r[1] for r in page.tables["summary"]}  # escaped, then parsed back
    assert any(h.startswith("Architecture") for h in page.h2) and "flux1" in text


def test_empty_report_renders_without_charts():
    page = _Page()
    page.feed(render_html_report(ConversionReport(input_file="a", output_file="b", layers=())))
    assert page.imgs == [] and "summary" in page.tables


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"cq\[report\]"):
        render_html_report(_report())


def test_large_model_charts_use_an_index_axis():
    layers = tuple(LayerReport(name=f"blocks.{i}.fc", action="quantize", format="int8_tensorwise", recipe="RTN",
                               metrics={"sqnr_db": 40.0 - (i % 7), "w8a8": 0.01 + (i % 5) / 1000}) for i in range(130))
    page = _Page()
    page.feed(render_html_report(ConversionReport(input_file="a", output_file="b", layers=layers)))
    assert len(page.imgs) == 2 and len(page.tables["layers"]) == 131
    svg = base64.b64decode(page.imgs[0]["src"].split(",", 1)[1]).decode()
    assert "layer index in model order (130 layers)" in svg and "blocks.129.fc" not in svg
