"""Tests for cq.io.layer_config: both layouts, validation errors, specificity ranking, the template."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from cq.errors import ConfigError
from cq.io.layer_config import (
    create_layer_config_template,
    generate_config_template,
    get_layer_settings,
    load_layer_config,
    match_layer_config,
    pattern_specificity,
)
from cq.selection import SelectionConfig, decide

# The reference's example (seed-behaviour.md §1.8).
REFERENCE_EXAMPLE = {
    "_default": {"format": "int8_axiswise", "scaling_mode": "axis"},
    "attn\\.qkv": {"format": "int8_tensorwise"},
    "blocks\\.\\d+\\.mlp\\.fc1": {"format": "int8_blockwise", "block_size": 64, "full_precision_matrix_mult": True},
    "fc2": {"skip": True},
}


@pytest.mark.parametrize("pattern,expected", [
    (r"blocks\.\d+\.mlp\.fc1", (0, 12)),
    (r"attn\.qkv", (1, 7)),
    ("double_blocks.0.img", (1, 17)),
    ("[abc]mlp(x|y)", (1, 12)),
    (r"a\d+b", (1, 2)),  # has \d but fewer than 8 literal characters
    (r"^layers\.\d+$", (1, 6)),
    (r"transformer_blocks\.\d+", (0, 18)),
])
def test_pattern_specificity_reference_examples(pattern, expected):
    assert pattern_specificity(pattern) == expected


def test_reference_example_loads_and_matches_like_the_reference():
    cfg = load_layer_config(REFERENCE_EXAMPLE)
    assert get_layer_settings("blocks.3.mlp.fc1.weight", cfg)["block_size"] == 64
    assert get_layer_settings("blocks.3.attn.qkv.weight", cfg)["format"] == "int8_tensorwise"
    assert get_layer_settings("blocks.3.mlp.fc2.weight", cfg) == {"skip": True}
    assert get_layer_settings("blocks.3.proj.weight", cfg) == {"format": "int8_axiswise", "scaling_mode": "axis"}
    assert set(cfg["_compiled_patterns"]) == {"attn\\.qkv", "blocks\\.\\d+\\.mlp\\.fc1", "fc2"}


def test_tier_zero_beats_a_longer_tier_one_pattern():
    cfg = load_layer_config({"double_blocks.0.mlp": {"format": "fp16"},
                             r"blocks\.\d+\.mlp": {"format": "int8"}})
    assert pattern_specificity(r"blocks\.\d+\.mlp") == (0, 9)
    assert match_layer_config("double_blocks.0.mlp.fc1.weight", cfg)[0] == r"blocks\.\d+\.mlp"


def test_longer_literal_wins_within_a_tier_and_ties_keep_file_order():
    cfg = load_layer_config({"mlp": {"format": "fp16"}, "mlp.fc1": {"format": "int8"}})
    assert get_layer_settings("b.0.mlp.fc1", cfg)["format"] == "int8"
    first = load_layer_config({"fc1": {"format": "fp16"}, "mlp": {"format": "int8"}})
    second = load_layer_config({"mlp": {"format": "int8"}, "fc1": {"format": "fp16"}})
    assert pattern_specificity("fc1") == pattern_specificity("mlp")
    assert get_layer_settings("b.0.mlp.fc1", first)["format"] == "fp16"
    assert get_layer_settings("b.0.mlp.fc1", second)["format"] == "int8"


def test_fullmatch_and_weight_suffix():
    cfg = load_layer_config({"mlp": {"format": "fp16"}})
    assert get_layer_settings("blocks.0.mlp.weight", cfg) is not None
    assert get_layer_settings("blocks.0.mlp.weight", cfg, fullmatch=True) is None
    assert get_layer_settings("mlp.weight", cfg, fullmatch=True)["format"] == "fp16"  # subject drops .weight


def test_api_md_layout_is_accepted_and_equals_the_top_level_layout():
    api = {"layer_patterns": {".*attention.*": {"format": "int8", "block_size": 64, "skip": False},
                              ".*final_layer.*": {"format": "fp16", "skip": False}}}
    top = {".*attention.*": {"format": "int8", "block_size": 64, "skip": False},
           ".*final_layer.*": {"format": "fp16", "skip": False}}
    a, b = load_layer_config(api), load_layer_config(top)
    assert {k: v for k, v in a.items() if k != "_compiled_patterns"} == \
           {k: v for k, v in b.items() if k != "_compiled_patterns"}
    assert get_layer_settings("x.final_layer.linear.weight", a)["format"] == "fp16"
    inner = load_layer_config({"layer_patterns": {"_default": {"format": "fp16"}, "a": {"skip": True}}})
    outer = load_layer_config({"layer_patterns": {"a": {"skip": True}}, "_default": {"format": "fp16"}})
    assert inner["_default"] == outer["_default"] == {"format": "fp16"}


def test_format_implies_scaling_mode_unless_given():
    cfg = load_layer_config({
        "a": {"format": "int8_tensorwise"},
        "b": {"format": "int8_tensorwise", "scaling_mode": "tensor"},
        "c": {"format": "int8_blockwise"},
        "d": {"format": "int8_axiswise"},
        "e": {"format": "int8"},
        "f": {"format": "int8", "scaling_mode": "block"},
        "g": {"format": "fp16"},
        "h": {"format": "skip"},
    })
    modes = {k: cfg[k].get("scaling_mode") for k in "abcdefg"}
    assert modes == {"a": "row", "b": "tensor", "c": "block", "d": "axis", "e": None, "f": "block", "g": None}
    assert cfg["h"]["skip"] is True
    # the reference turned {"format": "int8_tensorwise"} into blockwise under the default mode; cq does not
    d = decide("a.weight", (256, 256), torch.float32, SelectionConfig(scaling_mode="block", layer_config=cfg))
    assert (d.target, d.scaling_mode) == ("int8", "row")
    assert decide("g.weight", (256, 256), torch.float32, SelectionConfig(layer_config=cfg)).target == "fp16"
    assert decide("h.weight", (256, 256), torch.float32, SelectionConfig(layer_config=cfg)).action == "keep"


def test_loading_is_idempotent_and_ignores_underscore_keys():
    raw = {"_comment": "hi", "_exclusions": [], "fc": {"format": "int8_blockwise", "_shape": [3, 4]}}
    once = load_layer_config(raw)
    twice = load_layer_config(once)
    strip = lambda c: {k: v for k, v in c.items() if k != "_compiled_patterns"}  # noqa: E731
    assert strip(once) == strip(twice) == {"fc": {"format": "int8_blockwise", "scaling_mode": "block"}}
    assert raw["fc"] == {"format": "int8_blockwise", "_shape": [3, 4]}  # input not modified


@pytest.mark.parametrize("raw,match", [
    ({"fc": {"format": "int4"}}, r"format 'int4' is not one of \['int8', 'int8_tensorwise'"),
    ({"fc": {"format": ""}}, "still empty"),
    ({"_default": {"format": ""}}, "'_default': format '' is not one of"),
    ({"fc": {"block_size": 64}}, "needs a 'format'"),
    ({"fc": {"format": "int8", "blocksize": 64}}, r"unknown key\(s\) \['blocksize'\]"),
    ({"fc": {"format": "int8", "block_size": 0}}, "block_size must be a positive integer"),
    ({"fc": {"format": "int8", "block_size": True}}, "block_size must be a positive integer"),
    ({"fc": {"format": "int8", "skip": "no"}}, "'skip' must be true or false"),
    ({"fc": {"format": "int8", "scaling_mode": "col"}}, "scaling_mode 'col' is not one of"),
    ({"fc": {"format": "int8_blockwise", "scaling_mode": "row"}}, "contradicts format 'int8_blockwise'"),
    ({"fc": {"format": "int8_tensorwise", "scaling_mode": "block"}}, "contradicts format 'int8_tensorwise'"),
    ({"fc": "int8"}, "must be an object"),
    ({"blocks.(": {"format": "int8"}}, r"pattern 'blocks\.\(' is not a valid regex \(missing \)"),
    ({"layer_patterns": {"a": {"format": "int8"}}, "b": {"format": "int8"}}, "sit next to 'layer_patterns'"),
    ({"layer_patterns": {"_default": {"format": "int8"}}, "_default": {"format": "fp16"}}, "both inside and next"),
])
def test_validation_errors(raw, match):
    with pytest.raises(ConfigError, match=match):
        load_layer_config(raw)


def test_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "fc": {"format": "int8"},\n  "mlp": {"format" "fp16"}\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json.*not valid JSON: Expecting ':' delimiter at line 3, column 20"):
        load_layer_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_layer_config(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="is a directory"):
        load_layer_config(tmp_path)
    dup = tmp_path / "dup.json"
    dup.write_text('{"fc": {"format": "int8"}, "fc": {"format": "fp16"}}')
    with pytest.raises(ConfigError, match="key 'fc' appears twice"):
        load_layer_config(dup)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load_layer_config(arr)
    with pytest.raises(ConfigError, match="JSON file path or a dict"):
        load_layer_config(42)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(REFERENCE_EXAMPLE))
    assert load_layer_config(str(good))["fc2"] == {"skip": True}


def test_reference_template_with_empty_formats_is_rejected_with_a_hint():
    template = {"_default": {"format": ""}, "_exclusions": [], "blocks.0.fc": {"format": "", "_shape": [64, 64]}}
    with pytest.raises(ConfigError, match="still empty"):
        load_layer_config(template)


def _model():
    g = torch.Generator().manual_seed(3)
    return {
        "blk.1.fc.weight": torch.randn(32, 64, generator=g),
        "blk.11.fc.weight": torch.randn(32, 64, generator=g),
        "blk.1.fc.bias": torch.randn(32, generator=g),
        "blk.1.tiny.weight": torch.randn(8, 64, generator=g),
        "blk.1.conv.weight": torch.randn(4, 4, 3, 3, generator=g),
        "codes.weight": torch.zeros(32, 32, dtype=torch.int8),
    }


def test_template_is_loadable_and_each_entry_matches_only_its_layer():
    model = _model()
    template = create_layer_config_template(model)
    patterns = [k for k in template if not k.startswith("_")]
    assert patterns == [r"^blk\.1\.fc$", r"^blk\.11\.fc$"]
    assert template[r"^blk\.1\.fc$"] == {"format": "int8_tensorwise", "_shape": [32, 64]}
    cfg = load_layer_config(json.loads(json.dumps(template)))
    for fullmatch in (False, True):
        for key in ("blk.1.fc.weight", "blk.11.fc.weight"):
            pattern, _ = match_layer_config(key, cfg, fullmatch)
            assert re.fullmatch(pattern, key[: -len(".weight")])
        assert match_layer_config("blk.1.fc_extra.weight", cfg, fullmatch) is None
    fp16 = create_layer_config_template(model, format="fp16", min_dim=8)
    assert fp16[r"^blk\.1\.tiny$"]["format"] == "fp16"
    with pytest.raises(ConfigError):
        create_layer_config_template(model, format="int4")


def test_generate_config_template_writes_a_loadable_file(tmp_path):
    src, out = tmp_path / "m.safetensors", tmp_path / "m_layer_config_template.json"
    save_file(_model(), str(src))
    written, skipped = generate_config_template(src, out)
    assert (written, skipped) == (2, 3)  # tiny, conv and int8 weights are skipped
    cfg = load_layer_config(out)
    assert get_layer_settings("blk.11.fc.weight", cfg)["scaling_mode"] == "row"


def test_generate_config_template_bad_input(tmp_path):
    from cq.errors import InputError

    with pytest.raises(InputError, match="no such file"):
        generate_config_template(tmp_path / "missing.safetensors", tmp_path / "t.json")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(InputError, match="bad.safetensors: not a safetensors file"):
        generate_config_template(bad, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()
