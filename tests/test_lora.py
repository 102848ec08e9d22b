"""Tests for cq.lora and cq.transforms.lora: loading, alpha, key matching, merging, dampening."""

import math

import pytest
import torch

from tests.float_bounds import gamma, unit_roundoff
from tests.rotation_stand_ins import OneSidedBasis
from safetensors.torch import save_file

from cq.errors import CqError, InputError
from cq.lora import (
    dampening,
    load_lora_for_merging,
    load_lora_tensors,
    load_multiple_loras_for_merging,
    lora_key_map,
    merge_lora_into_weight,
    merge_multiple_loras,
)
from cq.state import LayerState
from cq.transforms.lora import LoraFactors, MergeLoraConfig, merge_lora


def _rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _ref(w, loras, dampen=True):
    """float64 reference of W + Σ_i scale_i · 0.9^i · alpha_i/rank_i · B_i A_i."""
    out = w.to(torch.float64).clone()
    for i, (a, b, alpha, rank, scale) in enumerate(loras):
        out += (scale * (0.9 ** i if dampen else 1.0) * alpha / rank) * (b.double() @ a.double())
    return out


def _merge_bound(w, loras, dampen=True, out_dtype=None):
    """Elementwise bound on ``|merge − _ref|`` for cq's merge (``W + Σ_i c_i·(B_i @ A_i)`` in float32,
    float64 for a float64 W, rounded to the output dtype once).

    Each delta is an r-term dot product times ``c_i = scale·0.9^i·alpha/rank`` (rounded to the compute
    dtype, then one product rounding): ≤ ``γ_{r+2}·|c_i|·|B_i||A_i|``; summing m deltas and adding W
    take m more roundings relative to ``T + |W|`` with ``T = Σ_i |c_i|·|B_i||A_i|``: together
    ``γ_{r+m+2}·(T + |W|)`` in the compute dtype's u (any GEMM order). The final cast to a 16-bit
    dtype adds its own ``u·|result|``. A missing or doubled dampening, a wrong alpha/rank or a
    transposed delta moves entries by ~|c·B·A| ≫ this.
    """
    w64 = w.double()
    cd = torch.float64 if w.dtype == torch.float64 else torch.float32
    out_dtype = out_dtype or w.dtype
    t = torch.zeros_like(w64)
    for i, (a, b, alpha, rank, scale) in enumerate(loras):
        t += abs(scale * (0.9 ** i if dampen else 1.0) * alpha / rank) * (b.double().abs() @ a.double().abs())
    r = max(a.shape[0] for a, *_ in loras)
    inner = gamma(r + len(loras) + 2, unit_roundoff(cd)) * (t + w64.abs())
    u_out = 0.0 if out_dtype in (torch.float32, torch.float64) else unit_roundoff(out_dtype)
    return inner + u_out * (_ref(w, loras, dampen).abs() + inner)


# ---------------------------------------------------------------------------------------------
# merging


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_merge_matches_a_float64_reference_and_keeps_the_dtype(dtype):
    n, k, r = 48, 40, 6
    w = _rand(n, k, seed=1, dtype=dtype)
    a, b = _rand(r, k, seed=2) * 0.1, _rand(n, r, seed=3) * 0.1
    w_before, a_before, b_before = w.clone(), a.clone(), b.clone()
    got = merge_lora_into_weight(w, a, b, alpha=3.0, rank=r, scale=0.7)
    ref = _ref(w, [(a, b, 3.0, r, 0.7)])
    assert got.dtype == dtype and got.shape == w.shape
    assert bool(((got.double() - ref).abs() <= _merge_bound(w, [(a, b, 3.0, r, 0.7)])).all())
    assert torch.equal(w, w_before) and torch.equal(a, a_before) and torch.equal(b, b_before)
    assert got.data_ptr() != w.data_ptr()


def test_merge_rejects_shapes_that_do_not_fit():
    w = torch.zeros(8, 6)
    with pytest.raises(InputError, match=r"A \[2, 5\], B \[8, 2\] does not fit the weight \[8, 6\]"):
        merge_lora_into_weight(w, torch.zeros(2, 5), torch.zeros(8, 2), 1.0, 2)
    with pytest.raises(InputError, match="rank=0 must be a positive int"):
        merge_lora_into_weight(w, torch.zeros(2, 6), torch.zeros(8, 2), 1.0, 0)
    with pytest.raises(InputError, match="must be finite"):
        merge_lora_into_weight(w, torch.zeros(2, 6), torch.zeros(8, 2), math.nan, 2)


def test_multiple_loras_are_dampened_once_by_0_9_to_the_i():
    n, k = 24, 20
    w = _rand(n, k, seed=10)
    loras = [(_rand(r, k, seed=20 + r), _rand(n, r, seed=30 + r), float(r + 1), r, s)
             for r, s in ((2, 1.0), (3, 0.5), (4, 2.0))]
    configs = [{"lora_A": a, "lora_B": b, "alpha": al, "rank": r, "scale": s} for a, b, al, r, s in loras]
    got = merge_multiple_loras(w, configs)
    bound = _merge_bound(w, loras, dampen=True)
    assert bool(((got.double() - _ref(w, loras, dampen=True)).abs() <= bound).all())
    off = merge_multiple_loras(w, configs, dampen=False)
    assert bool(((off.double() - _ref(w, loras, dampen=False)).abs() <= _merge_bound(w, loras, dampen=False)).all())
    # not the reference pipeline's double 0.81**i: outside the rounding bound, not merely "not close"
    double = w.double() + sum((s * 0.81 ** i * al / r) * (b.double() @ a.double())
                              for i, (a, b, al, r, s) in enumerate(loras))
    assert bool(((got.double() - double).abs() > bound).any())
    assert [dampening(i) for i in range(3)] == [1.0, 0.9, 0.9 ** 2]
    # a single config is exactly the single merge; scale defaults to 1
    one = {k_: v for k_, v in configs[0].items() if k_ != "scale"}
    assert torch.equal(merge_multiple_loras(w, [one]), merge_lora_into_weight(w, *loras[0][:4]))
    assert torch.equal(merge_multiple_loras(w, []), w)


# ---------------------------------------------------------------------------------------------
# loading


def _kohya_file(path, *, alpha_tensor=True, meta=None):
    g = torch.Generator().manual_seed(5)
    t = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 32, generator=g),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(96, 4, generator=g),
        "lora_unet_single_blocks_1_linear1.lora_down.weight": torch.randn(8, 32, generator=g),
        "lora_unet_single_blocks_1_linear1.lora_up.weight": torch.randn(64, 8, generator=g),
    }
    if alpha_tensor:
        t["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(2.0)
        t["lora_unet_single_blocks_1_linear1.alpha"] = torch.tensor(16.0, dtype=torch.bfloat16)
    save_file(t, str(path), metadata=meta)
    return t


def test_alpha_comes_from_alpha_tensors_first(tmp_path):
    p = tmp_path / "kohya.safetensors"
    t = _kohya_file(p, meta={"ss_network_alpha": "1.0"})
    lora = load_lora_for_merging(p)
    qkv = lora["lora_unet_double_blocks_0_img_attn_qkv"]
    assert (qkv["alpha"], qkv["rank"], qkv["alpha_source"]) == (2.0, 4, "tensor")
    lin = lora["lora_unet_single_blocks_1_linear1"]
    assert (lin["alpha"], lin["rank"], lin["alpha_source"]) == (16.0, 8, "tensor")
    assert torch.equal(qkv["lora_A"], t["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"])
    assert torch.equal(qkv["lora_B"], t["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"])


def test_alpha_is_the_tensor_or_the_rank_as_in_comfyui(tmp_path):
    g = torch.Generator().manual_seed(6)
    t = {"diffusion_model.a.lora_A.weight": torch.randn(2, 8, generator=g),
         "diffusion_model.a.lora_B.weight": torch.randn(8, 2, generator=g),
         "diffusion_model.b.lora_A.weight": torch.randn(4, 8, generator=g),
         "diffusion_model.b.lora_B.weight": torch.randn(8, 4, generator=g),
         "diffusion_model.b.alpha": torch.tensor(1.5)}
    p = tmp_path / "peft.safetensors"
    # header metadata is ignored, as ComfyUI ignores it (the reference read it and ignored the tensors)
    save_file(t, str(p), metadata={"diffusion_model_a_alpha": "1.5", "ss_network_alpha": "8"})
    lora = load_lora_for_merging(p)
    assert (lora["diffusion_model.a"]["alpha"], lora["diffusion_model.a"]["alpha_source"]) == (2.0, "rank")
    assert (lora["diffusion_model.b"]["alpha"], lora["diffusion_model.b"]["alpha_source"]) == (1.5, "tensor")
    assert set(load_lora_tensors(p)) == {"diffusion_model.a", "diffusion_model.b"}
    assert load_lora_tensors(None) == {} and load_lora_tensors("") == {}


def test_loading_errors_and_warnings(tmp_path):
    with pytest.raises(InputError, match="LoRA file not found"):
        load_lora_for_merging(tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match="cannot read LoRA file"):
        load_lora_for_merging(garbage)
    half = tmp_path / "half.safetensors"
    save_file({"x.lora_A.weight": torch.zeros(2, 4)}, str(half))
    with pytest.raises(InputError, match="LoRA key 'x.lora_A.weight' has no partner 'x.lora_B.weight'"):
        load_lora_for_merging(half)
    ranks = tmp_path / "ranks.safetensors"
    save_file({"x.lora_A.weight": torch.zeros(2, 4), "x.lora_B.weight": torch.zeros(4, 3)}, str(ranks))
    with pytest.raises(InputError, match="same rank"):
        load_lora_for_merging(ranks)
    dora = tmp_path / "dora.safetensors"
    save_file({"x.lora_A.weight": torch.zeros(2, 4), "x.lora_B.weight": torch.zeros(4, 2),
               "x.dora_scale": torch.ones(4, 1)}, str(dora))
    with pytest.warns(UserWarning, match=r"3 tensor\(s\) are not plain lora_A/lora_B/alpha matrices and are NOT "
                                         r"returned: x.dora_scale, x.lora_A.weight, x.lora_B.weight"):
        assert load_lora_for_merging(dora) == {}


def test_multiple_files_keep_path_order_and_source(tmp_path):
    p1, p2 = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _kohya_file(p1)
    _kohya_file(p2, alpha_tensor=False)
    multi = load_multiple_loras_for_merging([p1, p2])
    entries = multi["lora_unet_double_blocks_0_img_attn_qkv"]
    assert [e["source"] for e in entries] == ["one.safetensors", "two.safetensors"]
    assert [e["alpha"] for e in entries] == [2.0, 4.0]  # the second file has no alpha: alpha = rank
    with pytest.raises(InputError):
        load_multiple_loras_for_merging([p1, tmp_path / "missing.safetensors"])


# ---------------------------------------------------------------------------------------------
# key matching

MODEL_KEYS = [
    "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
    "model.diffusion_model.double_blocks.0.img_attn.qkv.bias",
    "model.diffusion_model.single_blocks.1.linear1.weight",
    "model.diffusion_model.final_layer.linear.weight",
]


def test_kohya_names_map_to_model_layers(tmp_path):
    p = tmp_path / "kohya.safetensors"
    _kohya_file(p)
    m = lora_key_map(MODEL_KEYS, load_lora_for_merging(p))
    assert m.complete and m.unmatched == ()
    assert m("model.diffusion_model.double_blocks.0.img_attn.qkv.weight") == ("lora_unet_double_blocks_0_img_attn_qkv",)
    assert m("model.diffusion_model.single_blocks.1.linear1") == ("lora_unet_single_blocks_1_linear1",)
    assert m("model.diffusion_model.final_layer.linear.weight") == ()
    assert m.targets["lora_unet_single_blocks_1_linear1"] == "model.diffusion_model.single_blocks.1.linear1"


@pytest.mark.parametrize("lora_stem, matched", [
    ("diffusion_model.final_layer.linear", True),      # ComfyUI's generic name, against a checkpoint
    ("lora_unet_final_layer_linear", True),            # kohya
    ("transformer.proj_out", True),                    # diffusers name of a Flux layer
    ("proj_out", True),                                # DiffSynth (bare diffusers) name
    ("model.diffusion_model.final_layer.linear", False),  # ComfyUI maps no such name
    ("transformer.final_layer.linear", False),         # native name with a diffusers prefix: not mapped
    ("base_model.model.final_layer.linear", False),    # PEFT prefix: SD3 / HunyuanDiT only
])
def test_names_are_matched_as_comfyui_matches_them(lora_stem, matched):
    m = lora_key_map(MODEL_KEYS, [lora_stem])
    assert m.targets == ({lora_stem: "model.diffusion_model.final_layer.linear"} if matched else {})
    assert m.unmatched == (() if matched else (lora_stem,))


def test_unmatched_entries_are_reported_and_slices_need_shapes():
    from cq.model import DictView

    keys = ["blocks.0.fc.weight", "blocks.1.fc.weight"]
    m = lora_key_map(keys, ["diffusion_model.blocks.0.fc", "blocks.9.fc", "lora_unet_blocks_1_fc", "blocks.1.fc"])
    assert m.unmatched == ("blocks.9.fc", "blocks.1.fc") and m.ambiguous == {}
    assert m("blocks.1.fc.weight") == ("lora_unet_blocks_1_fc",)
    assert not m.complete
    assert m.summary() == "2 LoRA layer(s) matched; 2 unmatched (blocks.9.fc, blocks.1.fc)"
    # Flux's diffusers q/k/v are slices of the fused qkv: located only when the view has shapes
    flux = {"img_in.weight": torch.zeros(4, 2), "double_blocks.0.img_attn.qkv.weight": torch.zeros(12, 4)}
    names = ["transformer.transformer_blocks.0.attn.to_k"]
    assert lora_key_map(list(flux), names).unmatched == tuple(names)
    m = lora_key_map(DictView(flux), names)
    assert m.targets == {names[0]: "double_blocks.0.img_attn.qkv"} and m.slices == {names[0]: (0, 4, 4)}


# ---------------------------------------------------------------------------------------------
# the merge_lora transform


class _Perm(OneSidedBasis):
    """A permutation of the input dimension: an orthogonal rotation for tests."""

    def __init__(self, k, seed):
        self.p = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        self.inv = torch.argsort(self.p)

    def rotate(self, x):
        return x[..., self.p]

    def unrotate(self, x):
        return x[..., self.inv]

    def comfy_fields(self):
        return {}



def test_transform_merges_into_weight_and_original():
    n, k = 16, 12
    w = _rand(n, k, seed=40, dtype=torch.bfloat16)
    a, b = _rand(3, k, seed=41), _rand(n, 3, seed=42)
    s = LayerState.from_weight("blk.fc", w)
    out = merge_lora(s, cfg=MergeLoraConfig([(a, b, 6.0, 3, 0.5), {"lora_A": a, "lora_B": b, "alpha": 3.0,
                                                                    "rank": 3, "source": "x.safetensors"}]))
    ref = _ref(w, [(a, b, 6.0, 3, 0.5), (a, b, 3.0, 3, 1.0)])
    assert out.weight is out.original and out.weight.dtype == torch.float32
    bound = _merge_bound(w, [(a, b, 6.0, 3, 0.5), (a, b, 3.0, 3, 1.0)], out_dtype=torch.float32)
    assert bool(((out.weight.double() - ref).abs() <= bound).all())
    assert out.stage_names() == ("merge_lora",)
    assert out.notes == ("merged 2 LoRAs (#0: scale 0.5, alpha/rank 2; x.safetensors: scale 0.9, alpha/rank 1)",)
    assert torch.equal(s.weight, w) and s.history == ()
    # float64 weights stay float64; no LoRAs is the identity
    s64 = LayerState.from_weight("fc", w.double())
    assert merge_lora(s64, cfg=MergeLoraConfig([(a, b, 1.0, 3)])).weight.dtype == torch.float64
    assert merge_lora(s) is s


def test_transform_rotates_the_delta_into_the_working_basis():
    n, k = 8, 10
    rot = _Perm(k, seed=1)
    original = _rand(n, k, seed=50)
    s = LayerState(name="fc", weight=rot.rotate(original), original=original, basis=rot)
    a, b = _rand(2, k, seed=51), _rand(n, 2, seed=52)
    out = merge_lora(s, cfg=MergeLoraConfig([(a, b, 2.0, 2)]))
    merged = merge_lora_into_weight(original, a, b, 2.0, 2)
    # a permutation moves float32 values without rounding, so the delta merged in the rotated basis
    # and mapped back is the same float32 arithmetic, entry for entry: bit-identical
    assert torch.equal(out.original, merged)
    assert torch.equal(rot.unrotate(out.weight), merged)


def test_transform_refuses_quantized_states_and_bad_loras():
    s = LayerState(name="fc", weight=torch.zeros(4, 4), codes=torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(CqError, match="fc: merge_lora must run before quantization"):
        merge_lora(s, cfg=MergeLoraConfig([(torch.zeros(1, 4), torch.zeros(4, 1), 1.0, 1)]))
    with pytest.raises(InputError, match="fc: LoRA #0"):
        merge_lora(LayerState.from_weight("fc", torch.zeros(4, 5)),
                   cfg=MergeLoraConfig([(torch.zeros(1, 4), torch.zeros(4, 1), 1.0, 1)]))
    with pytest.raises(ValueError, match="rank=0"):
        LoraFactors(torch.zeros(1, 4), torch.zeros(4, 1), 1.0, 0)
    with pytest.raises(ValueError, match="must be LoraFactors"):
        MergeLoraConfig([42])
