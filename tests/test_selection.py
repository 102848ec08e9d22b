"""Tests for cq.selection: candidates, precedence, fallback, --heur, config validation."""

import random

import pytest
import torch

from cq.errors import ConfigError
from cq.selection import (
    Decision,
    LayerOverride,
    SelectionConfig,
    decide,
    inefficiency,
    is_candidate,
    iter_decisions,
    tensor_triples,
    why_not_candidate,
)

BF16 = torch.bfloat16

# ---------------------------------------------------------------------------------------------
# What is a candidate


@pytest.mark.parametrize("key,shape,dtype,reason", [
    ("blocks.0.norm.weight", (64,), BF16, "not a 2-D .weight (1-D)"),
    ("blocks.0.conv.weight", (8, 4, 3), BF16, "not a 2-D .weight (3-D)"),
    ("patch_embedding.weight", (8, 4, 3, 3), torch.float32, "not a 2-D .weight (4-D)"),
    ("pos_embed", (64, 32), BF16, "not a .weight tensor"),
    ("scale_shift_table", (6, 32), BF16, "not a .weight tensor"),
    ("blocks.0.attn.qkv.bias", (96,), BF16, "not a .weight tensor"),
    ("blocks.0.attn.qkv.weight_scale", (), torch.float32, "not a .weight tensor"),
    ("int.weight", (64, 32), torch.int32, "not floating point (int32)"),
    ("q.weight", (64, 32), torch.int8, "not floating point (int8)"),
    ("mask.weight", (64, 32), torch.bool, "not floating point (bool)"),
    ("fp8.weight", (64, 32), torch.float8_e4m3fn, "already 8-bit (float8_e4m3fn)"),
])
def test_non_candidates_are_kept_unchanged(key, shape, dtype, reason):
    assert why_not_candidate(key, shape, dtype) == reason
    d = decide(key, shape, dtype, SelectionConfig(fallback="int8", custom_layers=".", custom="int8"))
    assert (d.action, d.rule, d.reason, d.target) == ("keep", "not_candidate", reason, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, None])
def test_2d_float_weights_are_candidates(dtype):
    assert is_candidate("blocks.0.attn.qkv.weight", (96, 32), dtype)
    assert is_candidate("x.lora_A.weight", (4, 32), dtype)
    assert is_candidate("lora_unet_x.lora_down.weight", (4, 32), dtype)


def test_empty_tensors_are_kept():
    for shape in [(0, 32), (32, 0)]:
        d = decide("fc.weight", shape, BF16)
        assert (d.action, d.reason) == ("keep", "empty tensor")


# ---------------------------------------------------------------------------------------------
# Precedence: remove > layer_config pattern > custom_layers > exclude_layers > presets > _default > default

LC = {
    r"blocks\.0\.attn": {"format": "int8_blockwise", "block_size": 64},
    r"blocks\.1\.attn": {"skip": True},
    "_default": {"format": "fp16"},
}
FULL = dict(presets=("t5xxl",), layer_config=LC, custom_layers=r"attn|head", custom=LayerOverride("fp16"),
            exclude_layers=r"attn|mlp|head|norm")

TABLE = [
    # key, config kwargs, (action, target, rule)
    ("decoder.blocks.0.attn.weight", FULL, ("remove", None, "remove")),
    ("encoder.lm_head.bias", FULL, ("remove", None, "remove")),
    ("blocks.0.attn.weight", FULL, ("quantize", "int8", "layer_config")),
    ("blocks.1.attn.weight", FULL, ("keep", None, "layer_config")),
    ("blocks.2.attn.weight", FULL, ("quantize", "fp16", "custom")),
    ("blocks.2.mlp.weight", FULL, ("keep", None, "exclude")),
    ("blocks.2.ffn.shared.weight", FULL, ("keep", None, "preset")),
    ("blocks.2.ffn.weight", FULL, ("quantize", "fp16", "layer_config_default")),
    ("blocks.2.ffn.weight", {}, ("quantize", "int8", "default")),
    ("blocks.2.ffn.weight", dict(target="fp16"), ("quantize", "fp16", "default")),
    # fallback: excluded and preset-kept layers use it, others are unaffected
    ("blocks.2.mlp.weight", {**FULL, "fallback": "int8"}, ("quantize", "int8", "exclude")),
    ("blocks.2.ffn.shared.weight", {**FULL, "fallback": "int8"}, ("quantize", "int8", "preset")),
    ("blocks.1.attn.weight", {**FULL, "fallback": "int8"}, ("keep", None, "layer_config")),
    # each rule alone
    ("blocks.5.head.weight", dict(custom_layers="head", custom="int8"), ("quantize", "int8", "custom")),
    ("blocks.5.head.weight", dict(exclude_layers="head"), ("keep", None, "exclude")),
    ("blocks.5.norm.weight", dict(presets=("mistral",)), ("keep", None, "preset")),
    ("blocks.5.norm.weight", dict(layer_config={"_default": {"skip": True}}), ("keep", None, "layer_config_default")),
]


@pytest.mark.parametrize("key,kwargs,expected", TABLE, ids=[f"{i}:{t[0]}" for i, t in enumerate(TABLE)])
def test_precedence_table(key, kwargs, expected):
    d = decide(key, (256, 256), BF16, SelectionConfig(**kwargs))
    assert (d.action, d.target, d.rule) == expected, d


def test_layer_config_overrides_are_carried_in_the_decision():
    d = decide("blocks.0.attn.weight", (256, 256), BF16,
               SelectionConfig(layer_config={r"attn": {"format": "int8_blockwise", "block_size": 64, "simple": True,
                                                        "full_precision_matrix_mult": True}}))
    assert (d.scaling_mode, d.block_size, d.simple, d.full_precision_matrix_mult) == ("block", 64, True, True)
    assert d.reason == "layer_config 'attn'"


def test_default_layer_config_does_not_switch_presets_off():
    cfg = SelectionConfig(presets=("wan",), layer_config={"_default": {"format": "int8_tensorwise"}})
    assert decide("head.head.weight", (64, 64), BF16, cfg).action == "keep"
    d = decide("blocks.0.ffn.0.weight", (64, 64), BF16, cfg)
    assert (d.rule, d.scaling_mode) == ("layer_config_default", "row")


def test_custom_and_fallback_overrides():
    cfg = SelectionConfig(custom_layers="attn", custom=LayerOverride("int8", block_size=32, scaling_mode="block",
                                                                     simple=True),
                          exclude_layers="mlp", fallback="fp16", fallback_block_size=16, fallback_simple=True)
    c = decide("b.attn.weight", (64, 64), BF16, cfg)
    assert (c.target, c.scaling_mode, c.block_size, c.simple) == ("int8", "block", 32, True)
    f = decide("b.mlp.weight", (64, 64), BF16, cfg)
    assert (f.target, f.scaling_mode, f.block_size, f.simple) == ("fp16", None, 16, True)
    assert f.reason == "exclude_layers → fallback fp16"
    # simple is inherited (None) unless the override sets it
    g = decide("b.mlp.weight", (64, 64), BF16, SelectionConfig(exclude_layers="mlp", fallback="int8"))
    assert g.simple is None and g.block_size is None


def test_exclude_and_custom_search_the_full_key():
    cfg = SelectionConfig(exclude_layers=r"\.weight$")
    assert decide("a.b.weight", (32, 32), BF16, cfg).action == "keep"
    cfg = SelectionConfig(exclude_layers=r"^b\.")  # re.search, anchored by the user
    assert decide("a.b.weight", (32, 32), BF16, cfg).action == "quantize"
    assert decide("b.c.weight", (32, 32), BF16, cfg).action == "keep"


# ---------------------------------------------------------------------------------------------
# --heur


def test_heur_divisibility_only_applies_to_block_mode():
    shape = (3072, 1000)  # 1000 is not a multiple of 128
    row = SelectionConfig(skip_inefficient_layers=True, scaling_mode="row")
    block = SelectionConfig(skip_inefficient_layers=True, scaling_mode="block")
    assert decide("fc.weight", shape, BF16, row).action == "quantize"
    d = decide("fc.weight", shape, BF16, block)
    assert (d.action, d.rule) == ("keep", "heur") and "not divisible by block 128" in d.reason
    assert decide("fc.weight", (3072, 1024), BF16, block).action == "quantize"
    # small dims are skipped in every mode
    for cfg in (row, block, SelectionConfig(skip_inefficient_layers=True, scaling_mode="tensor")):
        assert decide("fc.weight", (8, 1024), BF16, cfg).action == "keep"
    # without --heur nothing is skipped
    assert decide("fc.weight", (8, 1000), BF16, SelectionConfig(scaling_mode="block")).action == "quantize"


def test_heur_uses_the_layers_own_mode_and_block_size():
    lc = {r"fc": {"format": "int8_blockwise", "block_size": 8}}
    cfg = SelectionConfig(skip_inefficient_layers=True, scaling_mode="row", layer_config=lc)
    assert decide("fc.weight", (64, 1000), BF16, cfg).action == "quantize"  # 1000 % 8 == 0
    assert decide("fc.weight", (64, 1001), BF16, cfg).rule == "heur"
    assert decide("other.weight", (64, 1001), BF16, cfg).action == "quantize"  # row mode


def test_heur_skips_lora_keys_and_uses_custom_heur_for_custom_layers():
    cfg = SelectionConfig(skip_inefficient_layers=True, scaling_mode="block")
    assert decide("x.lora_A.weight", (4, 1000), BF16, cfg).action == "quantize"
    custom_on = SelectionConfig(custom_layers="attn", custom=LayerOverride("int8", heur=True))
    assert decide("attn.weight", (8, 64), BF16, custom_on).rule == "heur"
    assert decide("mlp.weight", (8, 64), BF16, custom_on).action == "quantize"  # global heur off
    custom_off = SelectionConfig(skip_inefficient_layers=True, custom_layers="attn", custom=LayerOverride("int8"))
    assert decide("attn.weight", (8, 64), BF16, custom_off).action == "quantize"
    assert decide("mlp.weight", (8, 64), BF16, custom_off).rule == "heur"


def test_inefficiency_reasons():
    assert inefficiency((64, 64), "block", 128) == "64×64 smaller than block 128"
    assert inefficiency((256, 200), "block", 128) == "256×200 not divisible by block 128"
    assert inefficiency((256, 256), "block", 128) is None
    assert inefficiency((15, 4096), None, 128) == "15×4096 has a dim < 16"
    assert inefficiency((16, 17), "axis", 128) is None


# ---------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize("option", ["exclude_layers", "custom_layers"])
def test_bad_regex_names_option_pattern_and_error(option):
    kwargs = {option: "blocks.(\\d+"}
    if option == "custom_layers":
        kwargs["custom"] = "int8"
    with pytest.raises(ConfigError) as e:
        SelectionConfig(**kwargs)
    msg = str(e.value)
    assert option in msg and "blocks.(\\\\d+" in msg and "missing ), unterminated subpattern" in msg


def test_custom_layers_without_custom_type_is_a_config_error():
    with pytest.raises(ConfigError, match="custom_layers='attn' needs a custom type"):
        SelectionConfig(custom_layers="attn")
    assert SelectionConfig(custom_layers="", custom=None).custom_layers is None  # "" means unset


def test_presets_from_filter_flags_and_unknown_names():
    cfg = SelectionConfig(presets={"lora": True, "wan": True, "t5xxl": False})
    assert cfg.presets == ("wan", "lora")  # registry order
    assert SelectionConfig(presets="qwen").presets == ("qwen",)
    assert SelectionConfig(presets=None).presets == ()
    with pytest.raises(ConfigError, match=r"unknown preset\(s\) \['flux'\].*'t5xxl'"):
        SelectionConfig(presets={"flux": True})
    with pytest.raises(ConfigError, match="valid presets are"):
        SelectionConfig(presets=("wan", "sdxl"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(target="int4"), "target='int4'"),
    (dict(fallback="fp4"), "fallback='fp4'"),
    (dict(scaling_mode="channel"), "scaling_mode='channel'"),
    (dict(heur_block_size=0), "heur_block_size=0"),
    (dict(heur_block_size=None), "heur_block_size=None"),
    (dict(fallback_block_size=-4), "fallback_block_size=-4"),
    (dict(custom={"type": "int8", "scaling_mode": "col"}), "custom scaling_mode='col'"),
    (dict(custom="int4"), "custom type='int4'"),
    (dict(skip_inefficient_layers="yes"), "skip_inefficient_layers='yes'"),
    (dict(layer_config={"fc": {"format": "int3"}}), "format 'int3'"),
])
def test_invalid_config_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SelectionConfig(**kwargs)


def test_configs_compare_by_value_and_hash():
    a = SelectionConfig(presets=("wan",), layer_config={"fc": {"format": "int8"}})
    b = SelectionConfig(presets={"wan": True}, layer_config={"fc": {"format": "int8"}})
    c = SelectionConfig(presets=("wan",), layer_config={"fc": {"format": "fp16"}})
    assert a == b and a != c and hash(a) == hash(b)


def test_from_legacy_maps_the_reference_parameters():
    cfg = SelectionConfig.from_legacy(filter_flags={"t5xxl": True, "wan": False}, fp16=True, fallback="int8",
                                      custom_layers="attn", custom_type="int8", custom_block_size=64,
                                      custom_scaling_mode="block", custom_simple=True, exclude_layers="mlp",
                                      fallback_block_size=32, fallback_simple=True, skip_inefficient_layers=True,
                                      layer_config={"fc": {"skip": True}}, layer_config_fullmatch=True,
                                      scaling_mode="block", block_size=256)
    assert cfg == SelectionConfig(target="fp16", scaling_mode="block", presets=("t5xxl",), exclude_layers="mlp",
                                  custom_layers="attn", custom=LayerOverride("int8", 64, "block", True, False),
                                  fallback="int8", fallback_block_size=32, fallback_simple=True,
                                  layer_config={"fc": {"skip": True}}, layer_config_fullmatch=True,
                                  skip_inefficient_layers=True, heur_block_size=256)
    assert SelectionConfig.from_legacy() == SelectionConfig()
    assert SelectionConfig.from_legacy(scaling_mode=None, block_size=None) == SelectionConfig()
    assert decide("fc.weight", (32, 32), BF16, SelectionConfig.from_legacy(fp16=True)).target == "fp16"
    with pytest.raises(ConfigError, match="needs a custom type"):
        SelectionConfig.from_legacy(custom_layers="attn", custom_block_size=64)


def test_decision_invariants():
    with pytest.raises(ConfigError):
        Decision("quantize")
    with pytest.raises(ConfigError):
        Decision("keep", target="int8")
    with pytest.raises(ConfigError):
        Decision("drop")
    assert Decision("quantize", target="int8").quantize


# ---------------------------------------------------------------------------------------------
# Iterating and random invariants


class FakeLoader:
    def __init__(self, tensors):
        self._t = tensors

    def keys(self):
        return list(self._t)

    def get_shape(self, key):
        return list(self._t[key].shape)

    def get_dtype(self, key):
        return self._t[key].dtype

    def get_tensor(self, key):  # pragma: no cover - must never be called
        raise AssertionError("decisions must not load tensor data")


class ShapeOnlyLoader(FakeLoader):
    get_dtype = None


def test_iter_decisions_over_loaders_state_dicts_and_triples():
    g = torch.Generator().manual_seed(0)
    sd = {"blk.0.fc.weight": torch.randn(32, 16, generator=g), "blk.0.fc.bias": torch.randn(32, generator=g),
          "codes.weight": torch.randint(-5, 5, (32, 16), generator=g, dtype=torch.int8)}
    expected = [("blk.0.fc.weight", "quantize"), ("blk.0.fc.bias", "keep"), ("codes.weight", "keep")]
    for source in (FakeLoader(sd), sd, list(tensor_triples(sd))):
        assert [(k, d.action) for k, d in iter_decisions(source)] == expected
    # a loader without get_dtype: dtype unknown, assumed floating point
    assert [d.action for _, d in iter_decisions(ShapeOnlyLoader(sd))] == ["quantize", "keep", "quantize"]
    assert list(tensor_triples(ShapeOnlyLoader(sd)))[0] == ("blk.0.fc.weight", (32, 16), None)


def test_random_decisions_respect_the_rules():
    rng = random.Random(7)
    parts = ["blocks", "0", "1", "attn", "qkv", "mlp", "head", "norm", "decoder", "lora_A", "shared", "img_in"]
    cfg = SelectionConfig(presets=("t5xxl",), exclude_layers="mlp", custom_layers="qkv", custom="fp16",
                          fallback="int8", skip_inefficient_layers=True)
    for _ in range(400):
        key = ".".join(rng.choice(parts) for _ in range(rng.randint(1, 4)))
        key += rng.choice([".weight", ".weight", ".bias", ""])
        shape = tuple(rng.choice([0, 4, 16, 64]) for _ in range(rng.choice([1, 2, 2, 3])))
        dtype = rng.choice([torch.float32, BF16, torch.int8])
        d = decide(key, shape, dtype, cfg)
        assert d == decide(key, shape, dtype, cfg)  # deterministic
        if "decoder" in key or "lm_head" in key:
            assert d.action == "remove"
        elif not is_candidate(key, shape, dtype) or 0 in shape:
            assert d.action == "keep"
        elif d.action == "quantize":
            assert d.target in ("int8", "fp16")
            assert d.target == ("fp16" if "qkv" in key else "int8")
        else:
            assert d.rule == "heur" and "lora_" not in key
