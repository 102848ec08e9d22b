"""Tests for cq.io.validate.validate_comfy_file: a clean file passes, each problem kind is caught."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from _io_helpers import raw_file
from cq.io import QUANT_METADATA_KEY, encode_comfy_quant, quantization_metadata, validate_comfy_file

N, K = 8, 16
TW = {"format": "int8_tensorwise"}


def good_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.02
    scale = w.abs().amax(1, keepdim=True) / 127
    w2 = torch.randn(N, N, generator=gen)
    return {
        "a.weight": torch.round(w / scale).to(torch.int8),
        "a.weight_scale": scale,
        "a.comfy_quant": encode_comfy_quant(TW),
        "a.bias": torch.randn(N, generator=gen),
        "b.weight": torch.round(w2 / (w2.abs().max() / 127)).to(torch.int8),
        "b.weight_scale": (w2.abs().max() / 127).reshape(()),
        "b.comfy_quant": encode_comfy_quant(TW),
        "norm.weight": torch.ones(K),
        "emb.weight": torch.randn(4, K, generator=gen).to(torch.bfloat16),
    }


def write(path, tensors, layers=None, **meta):
    metadata = dict(meta)
    if layers is not None:
        metadata[QUANT_METADATA_KEY] = layers if isinstance(layers, str) else quantization_metadata(layers)
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def problems_for(tmp_path, tensors, layers=None, **meta):
    return validate_comfy_file(write(tmp_path / "m.safetensors", tensors, layers, **meta))


def one(problems: list[str], needle: str) -> str:
    hits = [p for p in problems if needle in p]
    assert len(hits) == 1, (needle, problems)
    return hits[0]


def test_clean_file_has_no_problems(tmp_path):
    assert problems_for(tmp_path, good_tensors()) == []
    assert problems_for(tmp_path, good_tensors(), layers={"a": TW, "b": TW}) == []


def test_header_only_file_is_fine(tmp_path):
    t = {k: v for k, v in good_tensors().items() if not k.endswith(".comfy_quant")}
    assert problems_for(tmp_path, t, layers={"a": TW, "b": TW}) == []


def test_unreadable_file_is_one_problem(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"garbage" * 10)
    (msg,) = validate_comfy_file(p)
    assert "not a safetensors file" in msg


def test_gaps_and_unknown_dtypes(tmp_path):
    p = tmp_path / "g.safetensors"
    raw_file(p, {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"xy")
    assert validate_comfy_file(p) == ["1 trailing bytes after the last tensor"]
    if hasattr(torch, "float8_e8m0fnu"):
        one(problems_for(tmp_path, {"s": torch.ones(4).to(torch.float8_e8m0fnu)}), "unknown to ComfyUI")


@pytest.mark.parametrize("layers, needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format_version": "1.0"}), "'layers' object"),
    (json.dumps({"layers": {"a": {"group_size": 1}}}), "str 'format'"),
])
def test_bad_quantization_metadata(tmp_path, layers, needle):
    one(problems_for(tmp_path, good_tensors(), layers=layers), needle)


def test_comfy_quant_tensor_problems(tmp_path):
    t = good_tensors()
    t["a.comfy_quant"] = torch.zeros(29, dtype=torch.uint8)
    t["b.comfy_quant"] = encode_comfy_quant(TW).to(torch.int16)
    problems = problems_for(tmp_path, t)
    one(problems, "NUL")
    one(problems, "b.comfy_quant: must be a 1-D U8")
    # with their entries unreadable, the int8 weights and scales are orphans ComfyUI mis-loads
    one(problems, "a.weight: I8")
    one(problems, "b.weight_scale: a weight_scale without a quant entry")


def test_header_disagreeing_with_tensor(tmp_path):
    msg = one(problems_for(tmp_path, good_tensors(), layers={"a": {"format": "float8_e4m3fn"}, "b": TW}),
              "ComfyUI uses the header")
    assert msg.startswith("a:")


def test_entry_without_weight_and_on_conv(tmp_path):
    t = good_tensors()
    t["ghost.comfy_quant"] = encode_comfy_quant(TW)
    t["conv.weight"] = torch.ones(4, 2, 3, 3, dtype=torch.int8)
    t["conv.weight_scale"] = torch.ones(())
    t["conv.comfy_quant"] = encode_comfy_quant(TW)
    problems = problems_for(tmp_path, t)
    one(problems, "ghost: quant entry")
    one(problems, "conv: quant entry on a 4-D weight")
    assert len(problems) == 2


@pytest.mark.parametrize("entry", [{"format": "int8_blockwise", "group_size": 4}, {"format": "int8_axiswise"}])
def test_non_native_format(tmp_path, entry):
    t = good_tensors()
    t["a.comfy_quant"] = encode_comfy_quant(entry)
    one(problems_for(tmp_path, t), "not loadable by vanilla ComfyUI")


@pytest.mark.parametrize("change, needle", [
    (lambda t: t.update({"a.weight": t["a.weight"].to(torch.bfloat16)}), "casts it numerically"),
    (lambda t: t.pop("a.weight_scale"), "a.weight_scale is missing"),
    (lambda t: t.update({"a.weight_scale": t["a.weight_scale"].to(torch.bfloat16)}), "write scales as F32"),
    (lambda t: t.update({"b.weight_scale": torch.full((N,), 0.01)}), "is 1-D"),
    (lambda t: t.update({"a.weight_scale": torch.full((N, 2), 0.01)}), "shape [8, 2]"),
    (lambda t: t.update({"a.weight_scale": torch.where(torch.arange(N)[:, None] == 2, 0.0, t["a.weight_scale"])}),
     "1 of 8 values are not finite and positive"),
    (lambda t: t.update({"b.weight_scale": torch.tensor(float("inf"))}), "not finite and positive"),
    (lambda t: t.update({"a.input_scale": torch.ones(())}), "input_scale: ignored"),
    (lambda t: t.update({"a.comfy_quant": encode_comfy_quant({**TW, "convrot": True, "convrot_groupsize": 8})}),
     "power of 4"),
    (lambda t: t.update({"a.comfy_quant": encode_comfy_quant({**TW, "convrot": True, "convrot_groupsize": 64})}),
     "does not divide in_features 16"),
    (lambda t: t.update({"a.comfy_quant": encode_comfy_quant({**TW, "full_precision_matrix_mult": "yes"})}),
     "must be true/false"),
    (lambda t: t.update({"c.weight": torch.ones(N, K, dtype=torch.int8)}), "c.weight: I8"),
    (lambda t: t.update({"c.weight_scale": torch.ones(())}), "without a quant entry"),
    (lambda t: t.update({"c.scale_weight": torch.ones(())}), "legacy non-comfy"),
    (lambda t: t.update({"a.sign_row": torch.ones(N)}), "transform tensor"),
], ids=["float-weight", "no-scale", "bf16-scale", "1d-scale", "bad-shape", "zero-scale", "inf-scale",
        "input-scale", "convrot-g", "convrot-k", "fpmm", "orphan-int8", "orphan-scale", "scale_weight",
        "quip-extra"])
def test_layer_problems(tmp_path, change, needle):
    t = good_tensors()
    change(t)
    problems = problems_for(tmp_path, t)
    one(problems, needle)
    assert len(problems) == 1, problems


def test_convrot_ok_when_valid(tmp_path):
    t = good_tensors()
    t["a.comfy_quant"] = encode_comfy_quant({**TW, "convrot": True, "convrot_groupsize": 16})
    assert problems_for(tmp_path, t) == []


def test_validate_does_not_modify_the_file(tmp_path):
    p = write(tmp_path / "m.safetensors", good_tensors())
    before = p.read_bytes()
    validate_comfy_file(p)
    assert p.read_bytes() == before
