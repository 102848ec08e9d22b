"""End-to-end: GPTQ and QuIP through convert_to_int8 with a real calibration file, loaded as ComfyUI does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cq import check_with_comfy_kitchen, convert_to_int8, validate_comfy_file
from cq.calibrate import capture
from cq.io.calibration import save_calibration

BASE = dict(comfy_quant=True, filter_flags={}, calib_samples=64, seed=0)


class TinyMLP(torch.nn.Module):
    """Two Linear layers fed by inputs with a few outlier channels (like real activations)."""

    def __init__(self, g):
        super().__init__()
        self.fc1 = torch.nn.Linear(256, 128)
        self.fc2 = torch.nn.Linear(128, 64)
        with torch.no_grad():
            for lin in (self.fc1, self.fc2):
                t = torch.distributions.StudentT(4.0).sample(lin.weight.shape)
                lin.weight.copy_(t * 0.02)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _inputs(g, batches=8, tokens=128):
    mix = torch.randn(256, 256, generator=g) / 16
    scale = torch.ones(256)
    scale[torch.randperm(256, generator=g)[:4]] = 20.0  # outlier channels
    return [((torch.randn(tokens, 256, generator=g) @ mix) * scale) for _ in range(batches)]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    torch.manual_seed(0)  # StudentT sampling in TinyMLP uses the global generator
    g = torch.Generator().manual_seed(0)
    model = TinyMLP(g).eval()
    d = tmp_path_factory.mktemp("calib")
    src = d / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    calib = save_calibration(d / "calib.safetensors", capture(model, _inputs(g)))
    return src, calib, model.state_dict()


def _metrics(report):
    return {r.name: r.metrics for r in report.quantized}


def test_gptq_with_real_calibration_beats_rtn_and_loads(calibrated, tmp_path):
    src, calib, sd = calibrated
    out = tmp_path / "gptq.safetensors"
    rep = convert_to_int8(str(src), str(out), optimizer="gptq", calibration_data_path=str(calib),
                          gptq_actorder=True, **BASE)
    for name, m in _metrics(rep).items():
        assert m["rel_out_h"] < m["rel_out_rtn_h"], name  # the achieved proxy loss beats RTN on the same H
        assert m["rel_out_h"] < 1.15 * m["predicted_rel_out"] + 1e-12, name
    assert validate_comfy_file(str(out)) == []
    res = check_with_comfy_kitchen(str(out), {k[:-7]: v for k, v in sd.items() if k.endswith(".weight")})
    assert all(r["dequant_rel_err"] < 0.05 for r in res.values())


def test_gptq_without_calibration_is_rtn_with_a_note(calibrated, tmp_path):
    src, _, _ = calibrated
    rtn = convert_to_int8(str(src), str(tmp_path / "rtn.safetensors"), **BASE)
    gptq = convert_to_int8(str(src), str(tmp_path / "g.safetensors"), optimizer="gptq", **BASE)
    with safe_open(str(tmp_path / "rtn.safetensors"), "pt") as a, safe_open(str(tmp_path / "g.safetensors"), "pt") as b:
        for k in ("fc1.weight", "fc2.weight"):
            assert torch.equal(a.get_tensor(k), b.get_tensor(k))  # H = I: GPTQ is exactly RTN
    said = [n for n in gptq.notes if "H = I" in n]  # said once for the run, not once per layer
    assert len(said) == 1 and "(2 layers)" in said[0]
    assert not any("H = I" in n for r in gptq.quantized for n in r.notes)
    assert len(rtn.quantized) == 2


def test_quip_default_is_convrot_native_and_beats_rtn_in_w8a8(calibrated, tmp_path):
    from cq.kernels import int8_linear
    from cq.transforms import ConvRot

    src, calib, sd = calibrated
    rtn_out, out = tmp_path / "r.safetensors", tmp_path / "q.safetensors"
    convert_to_int8(str(src), str(rtn_out), **BASE)
    convert_to_int8(str(src), str(out), optimizer="quip", calibration_data_path=str(calib), **BASE)
    with safe_open(str(out), "pt") as f, safe_open(str(rtn_out), "pt") as r:
        entry = json.loads(bytes(f.get_tensor("fc1.comfy_quant").tolist()))
        q_codes, q_scale = f.get_tensor("fc1.weight"), f.get_tensor("fc1.weight_scale")
        r_codes, r_scale = r.get_tensor("fc1.weight"), r.get_tensor("fc1.weight_scale")
    assert entry == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
    # The runtime's W8A8 forward on held-out inputs of the same distribution (not the calibration set).
    x = _inputs(torch.Generator().manual_seed(0), batches=9)[8]  # same mix and outliers, a batch calibration never saw
    ref = x @ sd["fc1.weight"].t()

    def err(y):
        return float((y - ref).norm() / ref.norm())

    quip_err = err(int8_linear(ConvRot(256).rotate(x), q_codes, q_scale))
    rtn_err = err(int8_linear(x, r_codes, r_scale))
    assert quip_err < rtn_err / 2  # the outlier-channel layer: W8A8 error at least halved
    assert validate_comfy_file(str(out)) == []
    res = check_with_comfy_kitchen(str(out), {k[:-7]: v for k, v in sd.items() if k.endswith(".weight")})
    assert res["fc1"]["convrot"] and res["fc1"]["dequant_rel_err"] < 0.05


def test_quip_store_transformed_round_trips_through_quip_file(calibrated, tmp_path):
    from cq.io.quip_file import dequantize_transformed_file

    src, calib, sd = calibrated
    out = tmp_path / "t.safetensors"
    with pytest.warns(UserWarning, match="ComfyUI"):
        convert_to_int8(str(src), str(out), optimizer="quip", quip_store_transformed=True, quip_seed=3,
                        calibration_data_path=str(calib), **BASE)
    w = dequantize_transformed_file(str(out))
    for layer in ("fc1", "fc2"):
        ref = sd[layer + ".weight"]
        assert float((w[layer] - ref).norm() / ref.norm()) < 0.05
    assert any("not loadable by vanilla ComfyUI" in p for p in validate_comfy_file(str(out)))
