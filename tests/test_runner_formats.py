"""FP8 output mixed with INT8, architecture detection and the HTML report, through the CLI and the runner."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cq.cli import main
from tests.model_fixture import make_model_tensors


def _load(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _run(capsys, *argv):
    rc = main(list(argv) + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_fp8_per_layer_mixed_with_int8_and_fp16_loads_in_comfy_kitchen(model_file, tmp_path, capsys):
    from cq.io import check_with_comfy_kitchen, validate_comfy_file

    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({r"attn\.qkv": {"format": "float8_e4m3fn"}, r"mlp\.fc2": {"format": "fp16"}}))
    out = tmp_path / "o.safetensors"
    rc, stdout, err = _run(capsys, "-i", str(model_file), "-o", str(out), "--layer-config", str(cfg))
    assert rc == 0, err
    t = _load(out)
    assert t["blocks.0.attn.qkv.weight"].dtype == torch.float8_e4m3fn and t["blocks.0.attn.qkv.weight_scale"].shape == ()
    assert json.loads(bytes(t["blocks.0.attn.qkv.comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}
    assert t["blocks.0.attn.proj.weight"].dtype == torch.int8 and t["blocks.0.mlp.fc2.weight"].dtype == torch.float16
    assert validate_comfy_file(str(out)) == []
    src = make_model_tensors()
    res = check_with_comfy_kitchen(str(out), {s: src[s + ".weight"] for s in ("blocks.0.attn.qkv", "blocks.0.attn.proj")})
    # Quality against the float original (seeded data, elementwise dequantize: CPU-independent), not
    # parity. e4m3 has 3 mantissa bits: ≤ 2⁻⁴ relative per normal value (worst case 0.0625 for the
    # whole tensor), ≈ 0.027 RMS on Gaussian weights; bf16 dequantize adds ≤ 2⁻⁷. Per-row INT8:
    # ≈ √(2·ln 2K)/(127·√12) ≈ 0.008 on Gaussian rows (tests/test_api.py::test_files_load_in_comfy_kitchen).
    assert res["blocks.0.attn.qkv"]["dequant_rel_err"] < 0.05
    assert res["blocks.0.attn.proj"]["dequant_rel_err"] < 0.012
    assert "float8_e4m3fn" in stdout


def test_global_fp8_flag(model_file, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc, stdout, err = _run(capsys, "-i", str(model_file), "-o", str(out), "--fp8")
    assert rc == 0, err
    t = _load(out)
    assert all(t[k].dtype == torch.float8_e4m3fn for k in ("blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight"))
    rc, _, err = _run(capsys, "-i", str(model_file), "-o", str(tmp_path / "x.safetensors"), "--fp8", "--fp16")
    assert rc != 0 and "choose one" in err and not (tmp_path / "x.safetensors").exists()


def _wan_like(path):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    t = {"head.modulation": r(1, 2, 64), "head.head.weight": r(16, 64), "patch_embedding.weight": r(64, 4, 1, 2, 2),
         "blocks.0.self_attn.q.weight": r(64, 64), "blocks.1.self_attn.q.weight": r(64, 64),
         "text_embedding.0.weight": r(64, 32), "time_embedding.0.weight": r(64, 32)}
    save_file(t, str(path))


def test_detected_architecture_applies_its_preset_unless_told_not_to(tmp_path, capsys):
    src = tmp_path / "wan.safetensors"
    _wan_like(src)
    rc, stdout, err = _run(capsys, "-i", str(src), "-o", str(tmp_path / "a.safetensors"))
    assert rc == 0, err
    assert "note: auto preset: --wan (detected wan)" in stdout
    kept = _load(tmp_path / "a.safetensors")
    assert kept["head.head.weight"].dtype == torch.float32  # the wan preset keeps the head in high precision
    rc, stdout, err = _run(capsys, "-i", str(src), "-o", str(tmp_path / "b.safetensors"), "--no-auto-preset")
    assert rc == 0, err
    assert _load(tmp_path / "b.safetensors")["head.head.weight"].dtype == torch.int8
    rc, stdout, _ = _run(capsys, "-i", str(src), "--dry-run")
    assert stdout.startswith("architecture: wan (preset --wan)") and "head.modulation" in stdout


def test_report_html_is_written_and_parses(model_file, tmp_path, capsys):
    from html.parser import HTMLParser

    page = tmp_path / "r.html"
    rc, _, err = _run(capsys, "-i", str(model_file), "-o", str(tmp_path / "o.safetensors"), "--report-html", str(page))
    assert rc == 0, err

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.imgs, self.h2 = [], []
            self._in_h2 = False

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.imgs.append(dict(attrs)["src"])
            self._in_h2 = tag == "h2"

        def handle_data(self, data):
            if self._in_h2:
                self.h2.append(data)
                self._in_h2 = False

    p = Collect()
    p.feed(page.read_text())
    assert len(p.imgs) >= 2 and all(s.startswith("data:image/svg+xml;base64,") for s in p.imgs)
    assert "Architecture" in p.h2 and "Layers kept in high precision, and why" in p.h2


def test_report_html_path_is_checked_before_converting(model_file, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc, _, err = _run(capsys, "-i", str(model_file), "-o", str(out), "--report-html", str(model_file))
    assert rc == 2 and "--report-html" in err and not out.exists()


def test_fp8_input_scale_comes_from_the_calibration_absmax(model_file, tmp_path, capsys):
    from cq.calibrate import HessianStats
    from cq.io.calibration import save_calibration

    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 64, generator=g) * 3
    calib = tmp_path / "c.safetensors"
    save_calibration(calib, {"blocks.0.attn.proj": HessianStats(2 / 128 * x.T @ x, x.abs().amax(0), x.mean(0), 128)})
    out = tmp_path / "o.safetensors"
    rc, _, err = _run(capsys, "-i", str(model_file), "-o", str(out), "--fp8", "--fp8-input-scale",
                      "--calibration-data", str(calib))
    assert rc == 0, err
    t = _load(out)
    # e4m3's largest finite value is 448: the static scale maps the calibration's largest |x| onto it
    assert torch.allclose(t["blocks.0.attn.proj.input_scale"], x.abs().max() / 448)
    assert "blocks.0.mlp.fc1.input_scale" not in t  # no calibration entry for that layer: no static scale
    rc, _, err = _run(capsys, "-i", str(model_file), "-o", str(tmp_path / "x.safetensors"), "--fp8", "--fp8-input-scale")
    assert rc != 0 and "needs calibration data" in err
