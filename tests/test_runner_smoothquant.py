"""--smoothquant through the runner: folds applied to both layers of each mapping, the file still computes the model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cq import ConvertConfig, QuIP, convert_file
from cq.io.calibration import save_calibration
from cq.io import validate_comfy_file
from cq.io.comfy_kitchen_check import load_comfy_layers

sys.path.insert(0, str(Path(__file__).parent))
from flux_tiny import calibration_stats, forward, make_state_dict, random_inputs  # noqa: E402

H = 32


def _dequantized(path, src):
    out = {k: v.to(torch.float64) for k, v in src.items()}
    for layer, (qt, bias, _) in load_comfy_layers(path, compute_dtype=torch.float32).items():
        out[layer + ".weight"] = qt.dequantize().to(torch.float64)
        if bias is not None:
            out[layer + ".bias"] = bias.to(torch.float64)
    return out


@pytest.mark.parametrize("flux2", [False, True], ids=["flux1", "flux2"])
def test_smoothquant_file_computes_the_original_model(tmp_path, caplog, flux2):
    sd = make_state_dict(H, 2, double=1, single=1, seed=0, flux2=flux2)
    model = tmp_path / "flux.safetensors"
    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(model))
    calib = tmp_path / "calib.safetensors"
    save_calibration(calib, calibration_stats(sd, [random_inputs(H, seed=s) for s in range(3)]))
    img, txt, vec = random_inputs(H, seed=10)  # held-out inputs
    ref = forward(sd, img, txt, vec)
    errs = {}
    for smooth in (False, True):
        out = tmp_path / f"o{int(smooth)}.safetensors"
        with caplog.at_level(logging.WARNING, logger="cq"):
            report = convert_file(str(model), str(out), ConvertConfig(recipe=QuIP(), calibration_path=str(calib),
                                                                      smoothquant=smooth))
        assert validate_comfy_file(str(out)) == []
        y = forward(_dequantized(str(out), {k: v.float() for k, v in sd.items()}), img, txt, vec)
        errs[smooth] = float((y - ref).norm() / ref.norm())
        assert ("smoothquant" in report.model) == smooth
    # A fold applied to one side only would change the function by O(1); int8 weights alone cost ~1e-2.
    assert errs[True] < 0.05 and errs[False] < 0.05
    folded = report.model["smoothquant"]
    assert folded, "no mapping was folded"
    if flux2:
        assert any(f["kind"] == "gated_mlp" for f in folded["folded"]), folded
    assert "LoRA" in caplog.text  # runtime LoRAs on folded layers no longer match: said on the console
