"""Per-layer settings from a JSON layer config: loading, validation, matching and a template.

Two layouts are accepted and give the same result:

* the reference's real one: top-level keys are regexes, ``"_default"`` optional::

      {"_default": {"format": "int8_axiswise"},
       "attn\\\\.qkv": {"format": "int8_tensorwise"},
       "blocks\\\\.\\\\d+\\\\.mlp\\\\.fc1": {"format": "int8_blockwise", "block_size": 64},
       "fc2": {"skip": true}}

* the layout documented in the reference's API.md: ``{"layer_patterns": {<regex>: {...}}}``
  (``_default`` may sit inside or next to ``layer_patterns``).

An entry holds ``format`` (``int8``, ``int8_tensorwise``, ``int8_blockwise``, ``int8_axiswise``,
``fp16``, ``float8_e4m3fn`` (alias ``fp8``) or ``skip``), ``skip``, ``block_size``, ``scaling_mode`` (``tensor``/``row``/``axis``/
``block``), ``simple`` and ``full_precision_matrix_mult``; keys starting with ``_`` (``_shape``,
``_comment``) are ignored. Unlike the reference, the format selects the scaling mode:
``int8_tensorwise`` → ``row`` (or ``tensor``/``axis`` when ``scaling_mode`` says so),
``int8_blockwise`` → ``block``, ``int8_axiswise`` → ``axis``; ``int8`` uses ``scaling_mode`` or the
global mode. A ``scaling_mode`` that contradicts the format is a :class:`~cq.errors.ConfigError`.

Matching (:func:`get_layer_settings`) is the reference's: the subject is the key without a
trailing ``.weight``, every pattern that matches (``re.search``, or ``re.fullmatch``) is ranked
by :func:`pattern_specificity` and the first of the best is used (ties keep file order).
``_default`` applies only when no pattern matches. How a match combines with ``custom_layers``,
``exclude_layers`` and the presets is decided in :mod:`cq.selection`: an explicit pattern wins over
all of them, while ``_default`` only replaces the *global* settings, so presets still keep their
layers (the reference let ``_default`` switch every preset off).
"""

from __future__ import annotations

import json
import os
import re
import types
from typing import Any, Mapping

from ..errors import ConfigError

__all__ = [
    "LAYER_CONFIG_FORMATS",
    "ENTRY_KEYS",
    "load_layer_config",
    "get_layer_settings",
    "match_layer_config",
    "pattern_specificity",
    "create_layer_config_template",
    "generate_config_template",
]

#: Format strings an entry may use, with the scaling modes each one allows (first = implied).
LAYER_CONFIG_FORMATS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "int8": ("", "tensor", "row", "axis", "block"),
    "int8_tensorwise": ("row", "tensor", "axis"),
    "int8_blockwise": ("block",),
    "int8_axiswise": ("axis", "row"),
    "fp16": ("",),
    "float8_e4m3fn": ("",),
    "fp8": ("",),
    "skip": ("",),
})
SCALING_MODES = ("tensor", "row", "axis", "block")
ENTRY_KEYS = ("format", "skip", "block_size", "scaling_mode", "simple", "full_precision_matrix_mult")
_COMPILED = "_compiled_patterns"
_DEFAULT = "_default"
_WRAPPER = "layer_patterns"

# Two-character escapes (``\.``, ``\d``) and the regex metacharacters do not count as literal text.
_NON_LITERAL = re.compile(r"\\.|[.*+?^${}|\\]")


def pattern_specificity(pattern: str) -> tuple[int, int]:
    """The reference's ranking key ``(tier, literal_len)``: lower tier first, then longer literals.

    ``literal_len`` is the pattern's length without two-character escapes and without the
    characters ``.*+?^${}|\\`` (brackets and parentheses count); ``tier`` is 0 when the pattern
    contains the text ``\\d`` and ``literal_len >= 8``, else 1.

    Example:
        >>> pattern_specificity(r"blocks\\.\\d+\\.mlp\\.fc1"), pattern_specificity(r"attn\\.qkv")
        ((0, 12), (1, 7))
        >>> pattern_specificity("double_blocks.0.img"), pattern_specificity("[abc]mlp(x|y)")
        ((1, 17), (1, 12))
    """
    literal_len = len(_NON_LITERAL.sub("", pattern))
    tier = 0 if ("\\d" in pattern and literal_len >= 8) else 1
    return tier, literal_len


# ---------------------------------------------------------------------------------------------
# Loading and validation


def _reject_duplicates(source: str):
    def hook(pairs):
        seen: dict[str, Any] = {}
        for k, v in pairs:
            if k in seen:
                raise ConfigError(f"layer config {source}: key {k!r} appears twice; JSON keeps only the last, "
                                  "so merge the two entries into one")
            seen[k] = v
        return seen

    return hook


def _read_json(path: str | os.PathLike) -> dict:
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"layer config file not found: {source!r}; pass the path of a JSON file") from None
    except IsADirectoryError:
        raise ConfigError(f"layer config {source!r} is a directory; pass the path of a JSON file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"layer config {source!r} is not UTF-8 text ({e.reason}); save it as UTF-8 JSON") from None
    except OSError as e:
        raise ConfigError(f"cannot read layer config {source!r}: {e.strerror or e}") from None
    except ValueError as e:  # a path no OS accepts, e.g. with a NUL byte
        raise ConfigError(f"layer config path {source!r} is not a valid file name ({e})") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates(repr(source)))
    except json.JSONDecodeError as e:
        raise ConfigError(f"layer config {source!r} is not valid JSON: {e.msg} at line {e.lineno}, "
                          f"column {e.colno}") from None
    except RecursionError:  # "[[[[…" deeper than the interpreter's limit (found by fuzzing, issue 8.9)
        raise ConfigError(f"layer config {source!r} nests too deeply to be a layer config; it maps patterns "
                          "to settings, two levels deep") from None


def _check_bool(where: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key!r} must be true or false, got {value!r}")


def _normalize_entry(where: str, settings: Any) -> dict[str, Any]:
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{where} must be an object like {{\"format\": \"int8_tensorwise\"}}, "
                          f"got {type(settings).__name__} {settings!r}")
    unknown = sorted(k for k in settings if k not in ENTRY_KEYS and not str(k).startswith("_"))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; allowed keys are {list(ENTRY_KEYS)} "
                          "(keys starting with '_' are ignored)")
    entry = {k: v for k, v in settings.items() if k in ENTRY_KEYS}
    for key in ("skip", "simple", "full_precision_matrix_mult"):
        if key in entry:
            _check_bool(where, key, entry[key])
    if "block_size" in entry:
        bs = entry["block_size"]
        if not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0:
            raise ConfigError(f"{where}: block_size must be a positive integer such as 128, got {bs!r}")
    if "scaling_mode" in entry and entry["scaling_mode"] not in SCALING_MODES:
        raise ConfigError(f"{where}: scaling_mode {entry['scaling_mode']!r} is not one of {list(SCALING_MODES)}")

    fmt = entry.get("format")
    if fmt is None:
        if not entry.get("skip"):
            raise ConfigError(f"{where} needs a 'format' (one of {list(LAYER_CONFIG_FORMATS)}) "
                              "or \"skip\": true")
        return entry
    if not isinstance(fmt, str) or fmt not in LAYER_CONFIG_FORMATS:
        hint = " (the entry is still empty: fill it in or delete it)" if fmt == "" else ""
        raise ConfigError(f"{where}: format {fmt!r} is not one of {list(LAYER_CONFIG_FORMATS)}{hint}")
    if fmt == "skip":
        entry["skip"] = True
    allowed = LAYER_CONFIG_FORMATS[fmt]
    mode = entry.get("scaling_mode")
    if fmt.startswith("int8"):
        if mode is None and allowed[0]:
            entry["scaling_mode"] = allowed[0]
        elif mode is not None and mode not in allowed:
            raise ConfigError(f"{where}: scaling_mode {mode!r} contradicts format {fmt!r} (which allows "
                              f"{[m for m in allowed if m]}); drop scaling_mode, or use format 'int8' "
                              "to choose the mode freely")
    return entry


def _split_layout(raw: Mapping[str, Any], source: str) -> tuple[dict[str, Any], Any]:
    """(pattern entries, _default or None) from either accepted layout."""
    wrapped = raw.get(_WRAPPER)
    if isinstance(wrapped, Mapping) and all(isinstance(v, Mapping) for v in wrapped.values()):
        others = sorted(k for k in raw if k != _WRAPPER and not k.startswith("_"))
        if others:
            raise ConfigError(f"layer config {source}: {others} sit next to 'layer_patterns'; put every "
                              "pattern inside 'layer_patterns' (or drop the wrapper)")
        default = raw.get(_DEFAULT)
        if _DEFAULT in wrapped:
            if default is not None:
                raise ConfigError(f"layer config {source}: '_default' is given both inside and next to "
                                  "'layer_patterns'; keep one")
            default = wrapped[_DEFAULT]
        return {k: v for k, v in wrapped.items() if not k.startswith("_")}, default
    return {k: v for k, v in raw.items() if not k.startswith("_")}, raw.get(_DEFAULT)


def load_layer_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Load, validate and normalize a layer config (a JSON file path or an already-parsed dict).

    Returns the reference's top-level layout: ``{pattern: entry, ..., "_default": entry}`` plus
    ``"_compiled_patterns"`` (pattern → compiled regex). Entries are normalized: a ``format``
    fills in its implied ``scaling_mode``, ``"format": "skip"`` sets ``"skip": true``, and ``_``
    keys are dropped. Loading a loaded config again returns an equal config.

    Raises:
        ConfigError: unreadable file, bad JSON (with line and column), duplicate keys, a pattern
            that is not a valid regex, an unknown format or key, a contradictory scaling mode.

    Example:
        >>> cfg = load_layer_config({"layer_patterns": {"attn": {"format": "int8_blockwise"}}})
        >>> cfg["attn"]
        {'format': 'int8_blockwise', 'scaling_mode': 'block'}
    """
    if isinstance(path_or_dict, Mapping):
        raw, source = path_or_dict, "(dict)"
    elif isinstance(path_or_dict, (str, os.PathLike)):
        raw, source = _read_json(path_or_dict), repr(os.fspath(path_or_dict))
    else:
        raise ConfigError(f"layer_config must be a JSON file path or a dict, got {type(path_or_dict).__name__}")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"layer config {source} must be a JSON object of pattern → settings, "
                          f"got {type(raw).__name__}")
    patterns, default = _split_layout(raw, source)

    config: dict[str, Any] = {}
    compiled: dict[str, re.Pattern] = {}
    for pattern, settings in patterns.items():
        try:
            compiled[pattern] = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"layer config {source}: pattern {pattern!r} is not a valid regex ({e}); "
                              "escape literal dots and brackets as \\\\. \\\\[") from None
        config[pattern] = _normalize_entry(f"layer config {source} entry {pattern!r}", settings)
    if default is not None:
        config[_DEFAULT] = _normalize_entry(f"layer config {source} '_default'", default)
    config[_COMPILED] = compiled
    return config


# ---------------------------------------------------------------------------------------------
# Matching


def _stem(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def match_layer_config(key: str, config: Mapping[str, Any], fullmatch: bool = False) -> tuple[str, Mapping] | None:
    """``(pattern, entry)`` of the most specific explicit pattern matching ``key``, or ``None``.

    ``_default`` is not considered (see :func:`get_layer_settings`).

    Example:
        >>> cfg = load_layer_config({r"blocks\\.\\d+\\.mlp\\.fc1": {"format": "fp16"}, "mlp": {"skip": True}})
        >>> match_layer_config("blocks.3.mlp.fc1.weight", cfg)[0]
        'blocks\\\\.\\\\d+\\\\.mlp\\\\.fc1'
    """
    subject = _stem(key)
    compiled = config.get(_COMPILED) or {}
    best = None
    best_rank = None
    for pattern, entry in config.items():
        if pattern.startswith("_"):
            continue
        regex = compiled.get(pattern) or re.compile(pattern)
        if (regex.fullmatch(subject) if fullmatch else regex.search(subject)) is None:
            continue
        tier, length = pattern_specificity(pattern)
        rank = (tier, -length)
        if best_rank is None or rank < best_rank:  # strict: ties keep the first (file order)
            best, best_rank = (pattern, entry), rank
    return best


def get_layer_settings(layer_key: str, config: Mapping[str, Any], fullmatch: bool = False) -> Mapping | None:
    """The settings for ``layer_key``: the most specific matching pattern's entry, else ``_default``.

    Example:
        >>> cfg = load_layer_config({"_default": {"format": "fp16"}, r"attn\\.qkv": {"format": "int8"}})
        >>> get_layer_settings("blk.0.attn.qkv.weight", cfg)["format"], get_layer_settings("fc", cfg)["format"]
        ('int8', 'fp16')
    """
    hit = match_layer_config(layer_key, config, fullmatch)
    return hit[1] if hit is not None else config.get(_DEFAULT)


# ---------------------------------------------------------------------------------------------
# Template


def create_layer_config_template(loader_like: Any, *, format: str = "int8_tensorwise",
                                 min_dim: int = 16) -> dict[str, Any]:
    """A loadable layer config listing every quantizable layer of a model, ready to edit.

    ``loader_like`` is a loader (``keys()``, ``get_shape(key)``, ``get_dtype(key)``) or an
    iterable of ``(key, shape, dtype)``. Each 2-D floating-point ``.weight`` whose dims are both
    ``>= min_dim`` gets an entry keyed by its anchored, escaped name (``^blocks\\.0\\.fc$``, which
    matches that layer only, with ``re.search`` and ``re.fullmatch`` alike) holding ``format``
    and ``_shape`` (ignored when loading). Unlike the reference's template, this loads as-is.

    Example:
        >>> import torch
        >>> t = create_layer_config_template([("blk.0.fc.weight", (32, 64), torch.float32),
        ...                                   ("blk.0.fc.bias", (32,), torch.float32)])
        >>> t[r"^blk\\.0\\.fc$"], load_layer_config(t)[r"^blk\\.0\\.fc$"]["scaling_mode"]
        ({'format': 'int8_tensorwise', '_shape': [32, 64]}, 'row')
    """
    from ..selection import tensor_triples, why_not_candidate  # selection imports this module

    if format not in LAYER_CONFIG_FORMATS:
        raise ConfigError(f"template format {format!r} is not one of {list(LAYER_CONFIG_FORMATS)}")
    template: dict[str, Any] = {
        "_comment": "cq layer config: one entry per layer (regex → settings). Formats: "
                    + ", ".join(LAYER_CONFIG_FORMATS) + ". Delete entries to use the global settings.",
    }
    for key, shape, dtype in tensor_triples(loader_like):
        if why_not_candidate(key, shape, dtype) is not None or min(shape) < min_dim:
            continue
        template["^" + re.escape(_stem(key)) + "$"] = {"format": format, "_shape": [int(d) for d in shape]}
    return template


def generate_config_template(input_file: str | os.PathLike, output_path: str | os.PathLike,
                             block_size: int = 128) -> tuple[int, int]:
    """Write :func:`create_layer_config_template` of a safetensors file as JSON (reference name).

    Returns ``(entries written, weight tensors skipped)``. ``block_size`` is accepted for
    compatibility and unused (the reference did not use it either).
    """
    from ..selection import tensor_triples
    from .loader import read_header
    from .writer import write_text_atomic

    header = read_header(input_file)  # the strict reader: InputError naming the file on any damage
    triples = [(key, tuple(info.shape), info.dtype) for key, info in header.tensors.items()]
    template = create_layer_config_template(triples)
    written = sum(1 for k in template if not k.startswith("_"))
    weights = sum(1 for k, _, _ in tensor_triples(triples) if k.endswith(".weight"))
    write_text_atomic(output_path, json.dumps(template, indent=2))
    return written, weights - written
