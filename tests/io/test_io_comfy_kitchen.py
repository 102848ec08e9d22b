"""Tests for cq.io.comfy_kitchen_check: cq-written files load through comfy-kitchen as ComfyUI does."""

from __future__ import annotations

import sys

import attrs
import pytest
import torch

from tests.float_bounds import UBF16, group_rotation_gap, norm_gap
from tests.rotation_stand_ins import OneSidedBasis

pytest.importorskip("comfy_kitchen")

from comfy_kitchen.tensor.int8_utils import _build_hadamard  # noqa: E402

from cq.errors import InputError  # noqa: E402
from cq.io import (  # noqa: E402
    QUANT_METADATA_KEY,
    SafetensorsWriter,
    comfy_quant_entry,
    encode_comfy_quant,
    layer_tensors,
    quantization_metadata,
    validate_comfy_file,
    write_safetensors,
)
from cq.io.comfy_kitchen_check import check_with_comfy_kitchen  # noqa: E402
from cq.state import LayerState, PerRow, PerTensor  # noqa: E402
from cq.transforms import ScaleConfig, absmax_scale, reconstruct, round_to_nearest  # noqa: E402


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def build(name, n, k, gran, gen, *, bias=True, rotation=None):
    w = torch.randn(n, k, generator=gen) * 0.02
    b = torch.randn(n, generator=gen) * 0.01 if bias else None
    s = LayerState.from_weight(name, w, bias=b)
    if rotation is not None:
        s = attrs.evolve(s, weight=rotation.rotate(w), basis=rotation)
    return round_to_nearest(absmax_scale(s, cfg=ScaleConfig(gran)))


def write_states(path, states, *, header=True):
    entries = {}
    with SafetensorsWriter(path, metadata=None if not header else {
            QUANT_METADATA_KEY: quantization_metadata({s.name: comfy_quant_entry(s) for s in states})}) as w:
        for s in states:
            entries[s.name] = comfy_quant_entry(s)
            for key, t in layer_tensors(s).items():
                w.add(key, t)
    return {f"{s.name}.weight": s.original for s in states}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    gen = torch.Generator().manual_seed(2024)
    states = [
        build("model.blk.0.row", 256, 512, PerRow(), gen),
        build("model.blk.0.row_square", 256, 256, PerRow(), gen),
        build("model.blk.0.tensor", 256, 512, PerTensor(), gen),
        build("model.blk.0.odd", 33, 40, PerRow(), gen, bias=False),
    ]
    path = tmp_path_factory.mktemp("ck") / "q.safetensors"
    originals = write_states(path, states)
    return path, states, originals


def test_written_file_is_structurally_valid(written):
    path, _, _ = written
    assert validate_comfy_file(path) == []


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_comfy_kitchen_reproduces_the_weights(written, compute_dtype):
    path, states, originals = written
    report = check_with_comfy_kitchen(path, originals, tokens=32, seed=1, compute_dtype=compute_dtype)
    assert set(report) == {s.name for s in states}
    for s in states:
        r = report[s.name]
        assert r["finite"] and r["format"] == "int8_tensorwise" and not r["convrot"]
        # ComfyUI's dequantize is float32 codes·scale (cq's reconstruct, the same one rounding) cast to
        # the compute dtype: bf16 adds one rounding of ≤ 2⁻⁸|ŵ| per entry, float32 none. By the triangle
        # inequality the relative errors then differ by ≤ u_c·‖ŵ‖/‖W‖, plus the float64 norms' own
        # rounding on both sides (≤ 4·γ_{NK+2}(2⁻⁵³)·max(rel, 1)). A wrong scale broadcast (≈ 0.18, see
        # below) or a dropped scale is far outside.
        w_hat = reconstruct(s)
        ours = _rel(w_hat, s.original)
        u_c = UBF16 if compute_dtype == torch.bfloat16 else 0.0
        tol = u_c * float(w_hat.double().norm() / s.original.double().norm()) + 4 * norm_gap(w_hat.numel())
        assert abs(r["dequant_rel_err"] - ours) <= tol, (s.name, r, ours, tol)
        if isinstance(s.granularity, PerRow):
            assert r["scale_shape"] == (s.shape[0], 1)
            assert r["dequant_rel_err"] < 0.012  # ≈ 0.0076 for absmax/127 rows of N(0, 0.02²)
        else:
            assert r["scale_shape"] == ()
            assert r["dequant_rel_err"] < 0.016  # ≈ 0.0105 tensor-wise
        assert 0 < r["forward_rel_err"] < 0.03  # W8A8: weight and per-token activation rounding
        assert 0 < r["kernel_consistency"] < 0.02  # activation rounding only


def test_report_is_deterministic(written):
    path, _, originals = written
    assert check_with_comfy_kitchen(path, originals, seed=3) == check_with_comfy_kitchen(path, originals, seed=3)


def test_header_overrides_tensors_like_comfyui(tmp_path):
    gen = torch.Generator().manual_seed(5)
    s = build("fc", 32, 64, PerRow(), gen)
    t = layer_tensors(s)
    t["fc.comfy_quant"] = encode_comfy_quant({"format": "float8_e4m3fn"})
    path = tmp_path / "h.safetensors"
    from safetensors.torch import save_file  # bypass cq's writer, which refuses the disagreement

    save_file(t, str(path), metadata={QUANT_METADATA_KEY: quantization_metadata({"fc": {"format": "int8_tensorwise"}})})
    report = check_with_comfy_kitchen(path, {"fc": s.original})  # layer-stem keys work too
    assert report["fc"]["format"] == "int8_tensorwise" and report["fc"]["dequant_rel_err"] < 0.012


@attrs.frozen
class ComfyConvRot(OneSidedBasis):
    """ComfyUI's ConvRot: ``W_rot = W · blockdiag(Hᵀ)`` with comfy-kitchen's regular Hadamard H."""

    k: int
    g: int

    def _r(self, dtype):
        h = _build_hadamard(self.g, dtype=torch.float64)
        return torch.block_diag(*[h.T] * (self.k // self.g)).to(dtype)

    def rotate(self, x):
        return x @ self._r(x.dtype)

    def unrotate(self, x):
        return x @ self._r(x.dtype).T

    def comfy_fields(self):
        return {"convrot": True, "convrot_groupsize": self.g}

    native = True


def test_convrot_layer_dequantizes_to_the_original_basis(tmp_path):
    gen = torch.Generator().manual_seed(9)
    s = build("rot", 64, 128, PerRow(), gen, rotation=ComfyConvRot(128, 16))
    path = tmp_path / "r.safetensors"
    originals = write_states(path, [s])
    assert validate_comfy_file(path) == []
    r = check_with_comfy_kitchen(path, originals, compute_dtype=torch.float32)["rot"]
    assert r["convrot"]
    # comfy-kitchen un-rotates codes·scale with its dense per-group float32 product, cq with its own
    # factors: two float32 evaluations of ŵ·Rᵀ, within group_rotation_gap elementwise (√G·eps·Σ_group|ŵ|,
    # see tests/test_convrot.py); the relative errors differ by at most that gap's norm over ‖W‖.
    w_hat = reconstruct(s)
    wq = s.codes.float() * s.scale
    tol = float(group_rotation_gap(wq, 16).norm() / s.original.double().norm()) + 4 * norm_gap(wq.numel())
    assert abs(r["dequant_rel_err"] - _rel(w_hat, s.original)) <= tol
    assert r["dequant_rel_err"] < 0.012 and r["forward_rel_err"] < 0.03


def test_1d_row_scale_is_silently_wrong_when_square(tmp_path):
    """Why cq never writes ``[N]`` scales: the kernel is right, dequantize (LoRA path) is not."""
    gen = torch.Generator().manual_seed(11)
    s = build("sq", 256, 256, PerRow(), gen, bias=False)
    t = layer_tensors(s)
    t["sq.weight_scale"] = t["sq.weight_scale"].reshape(256)
    path = tmp_path / "n.safetensors"
    write_safetensors(path, t)
    r = check_with_comfy_kitchen(path, {"sq.weight": s.original})["sq"]
    assert r["forward_rel_err"] < 0.03  # the W8A8 kernel flattens the scale: correct
    assert r["dequant_rel_err"] > 0.1  # dequantize broadcasts along K: ≈ 0.18, no error raised
    assert any("is 1-D" in p for p in validate_comfy_file(path))

    rect = build("re", 32, 64, PerRow(), gen, bias=False)
    t = layer_tensors(rect)
    t["re.weight_scale"] = t["re.weight_scale"].reshape(32)
    write_safetensors(path, t)
    with pytest.raises(RuntimeError, match="must match"):
        check_with_comfy_kitchen(path, {"re.weight": rect.original})


def test_unknown_format_is_refused(tmp_path):
    gen = torch.Generator().manual_seed(1)
    s = build("b", 8, 16, PerRow(), gen)
    t = layer_tensors(s)
    t["b.comfy_quant"] = encode_comfy_quant({"format": "int8_blockwise", "group_size": 8})
    path = tmp_path / "b.safetensors"
    write_safetensors(path, t)
    with pytest.raises(InputError, match="int8_blockwise"):
        check_with_comfy_kitchen(path, {})


def test_missing_comfy_kitchen_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "comfy_kitchen", None)
    with pytest.raises(ImportError, match="pip install comfy-kitchen packaging"):
        check_with_comfy_kitchen(tmp_path / "any.safetensors", {})
