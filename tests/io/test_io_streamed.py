"""The speed pieces composed as the runner will call them (prefetch → fused_rtn → background write)
write a file ComfyUI loads, holding exactly the unfused recipe's codes and scales."""

from __future__ import annotations

import pytest
import torch

from cq.io import SafetensorsWriter, UnifiedSafetensorsLoader, layer_tensors, validate_comfy_file, write_safetensors
from cq.io.prefetch import BackgroundWriter, prefetch_file
from cq.state import LayerState
from cq.transforms import absmax_scale, round_to_nearest
from cq.transforms.fused import fused_rtn


def _model():
    g = torch.Generator().manual_seed(4)
    return {
        "blocks.0.attn.qkv.weight": (torch.randn(96, 64, generator=g) * 0.02).to(torch.bfloat16),
        "blocks.0.attn.qkv.bias": torch.randn(96, generator=g).to(torch.bfloat16),
        "blocks.0.mlp.fc1.weight": torch.randn(160, 64, generator=g) * 0.05,
        "blocks.0.norm.weight": torch.ones(64),
        "final.linear.weight": (torch.randn(16, 64, generator=g) * 0.02).to(torch.float16),
    }


@pytest.mark.parametrize("zero_copy", [True, False], ids=["mmap", "read"])
def test_streamed_rtn_file_loads_in_comfy_kitchen_with_the_unfused_codes(tmp_path, zero_copy):
    pytest.importorskip("comfy_kitchen")
    from cq.io.comfy_kitchen_check import check_with_comfy_kitchen

    data = _model()
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_safetensors(src, data)
    quantized = {k for k, t in data.items() if k.endswith(".weight") and t.ndim == 2}
    with SafetensorsWriter(dst, forbid=[src]) as w, BackgroundWriter(w, depth=2) as bw:
        for key, t in prefetch_file(src, zero_copy=zero_copy):
            if key in quantized:
                out = fused_rtn(LayerState.from_weight(key[:-len(".weight")], t))
                for name, x in layer_tensors(out).items():
                    bw.add(name, x)
            else:
                bw.add(key, t)
    assert validate_comfy_file(str(dst)) == []
    with UnifiedSafetensorsLoader(dst) as f:
        for key in quantized:
            ref = round_to_nearest(absmax_scale(LayerState.from_weight(key[:-7], data[key])))
            assert torch.equal(f.get_tensor(key), ref.codes)
            assert torch.equal(f.get_tensor(key[:-7] + ".weight_scale"), ref.scale)
        for key in set(data) - quantized:
            assert torch.equal(f.get_tensor(key), data[key]) and f.get_dtype(key) == data[key].dtype
    report = check_with_comfy_kitchen(str(dst), {k: data[k].float() for k in quantized})
    assert set(report) == {k[:-7] for k in quantized}
    assert all(r["finite"] and r["format"] == "int8_tensorwise" and r["dequant_rel_err"] < 0.02
               for r in report.values())
