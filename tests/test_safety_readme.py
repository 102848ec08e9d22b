"""Issue 8, items 4, 8 and 10: every README example runs after a plain ``import cq``, and the README's
promises (the Safety section, what a bad Hessian does) are what cq does.

The examples use a few placeholders a reader supplies (``src``, ``model``, ``batches``, ``W`` and
files such as ``model.safetensors``); here they are small stand-ins in a temporary folder, and the
blocks run in order in one namespace, as in one Python session.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _stand_ins(folder: Path) -> None:
    from cq.io import write_safetensors

    g = torch.Generator().manual_seed(0)
    model = {"blocks.0.attn.qkv.weight": torch.randn(96, 32, generator=g),
             "blocks.0.fc1.weight": torch.randn(64, 32, generator=g), "blocks.0.fc1.bias": torch.randn(64, generator=g)}
    write_safetensors(folder / "model.safetensors", model)
    write_safetensors(folder / "flux1-dev.safetensors",
                      {"double_blocks.0.img_attn.qkv.weight": torch.randn(96, 32, generator=g)})
    for name in ("style", "detail"):
        write_safetensors(folder / f"{name}.safetensors", {
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 32, generator=g) * 0.01,
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(96, 4, generator=g) * 0.01})


@pytest.mark.slow
def test_every_readme_python_example_runs_after_a_plain_import_cq(tmp_path):
    _stand_ins(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) >= 5
    setup = textwrap.dedent(f"""
        import os, torch
        os.chdir({str(tmp_path)!r})
        src = "model.safetensors"
        model = torch.nn.Module()
        model.blocks = torch.nn.ModuleList([torch.nn.Module()])
        model.blocks[0].fc1 = torch.nn.Linear(32, 64)
        model.forward = lambda x: model.blocks[0].fc1(x)
        batches = [torch.randn(16, 32) for _ in range(2)]
        W = model.blocks[0].fc1.weight.detach()
    """)
    # One fresh interpreter: `import cq` is all the examples get (no cq submodule imported before).
    script = "import cq\n" + setup + "\n".join(
        f"exec(compile({b!r}, 'README.md block {i}', 'exec'))" for i, b in enumerate(blocks, 1))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


def test_readme_has_a_safety_section_that_matches_the_exit_statuses():
    text = README.read_text()
    section = text[text.index("## Safety"):]
    section = section[:section.index("\n## ", 4)]
    for promise in ("never unpickles", "temporary file", "--report-json", "130", "143", "129", "pickle",
                    "nothing to quantize"):
        assert promise in section, promise
    from cq.cli import main

    doc = main.__doc__
    for status in ("0:", "1:", "2:", "130", "129/143"):
        assert status in doc


def test_readme_and_behaviour_agree_on_a_nan_hessian(tmp_path):
    """README: a NaN/Inf Hessian handed to a pipeline gives round-to-nearest and a warning note; one
    read from a calibration file is a damaged file and stops the run with one line."""
    from cq.io.calibration import load_calibration
    from cq.errors import InputError
    from cq.io import write_safetensors
    from cq.state import LayerState
    from cq.transforms import absmax_scale, gptq_update, round_to_nearest

    text = " ".join(README.read_text().split())
    assert "NaN" in text and "round-to-nearest with a `warning:` note" in text
    h = torch.eye(8)
    h[1, 1] = float("nan")
    s = absmax_scale(LayerState.from_weight("fc", torch.randn(4, 8), hessian=h))
    out = gptq_update(s)
    assert torch.equal(out.codes, round_to_nearest(s).codes) and out.notes[-1].startswith("warning: Hessian has")
    write_safetensors(tmp_path / "c.safetensors", {"fc.hessian": h}, metadata={"format": "cq-calibration-1",
                                                                                 "samples": "4"})
    with pytest.raises(InputError, match="fc.hessian has 1 NaN/Inf"):
        load_calibration(tmp_path / "c.safetensors").hessian("fc")
