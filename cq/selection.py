"""What happens to every tensor of a model file: quantize, keep unchanged, or remove.

:func:`decide` is a pure function of ``(key, shape, dtype, SelectionConfig)``; it never loads
tensor data. The rules, in order (first that applies wins):

1. **remove**: the key contains a ``remove`` substring of an active preset (``--t5xxl``:
   ``decoder``, ``lm_head``). Applies to *every* tensor, not only weights.
2. **not a candidate** → keep unchanged: only 2-D floating-point tensors whose key ends in
   ``.weight`` are quantized (LoRA ``lora_A/lora_B/lora_up/lora_down`` ``.weight`` matrices
   included). 1-D/3-D/4-D tensors, integer, bool and float8 tensors (already quantized), and
   keys without ``.weight`` are copied as they are.
3. **empty** tensors are kept.
4. **layer config**, an explicit pattern matches (see :mod:`cq.io.layer_config`): ``skip`` keeps the
   layer; otherwise the entry's format and settings are used. This wins over everything below.
5. **custom_layers** (``re.search`` on the full key) → the ``custom`` settings.
6. **exclude_layers** (``re.search`` on the full key) → the ``fallback`` format if given, else keep.
7. **presets**: the key contains a ``keep`` substring of an active preset → fallback, else keep.
8. **layer config ``_default``** (only reached by layers nothing above claimed) → its settings.
9. **default**: quantize to the global target with the global settings.

Then, for a layer about to be quantized, ``--heur`` (``skip_inefficient_layers``, or
``custom.heur`` for custom layers; never for keys containing ``lora_``) keeps layers that do
not suit INT8. **Deviation from the reference:** the reference skipped every layer whose dims
are smaller than or not divisible by the global block size, even in tensor/row/axis modes that
do not need divisibility; cq applies that test only to layers whose scaling mode is ``block``
(with the layer's own block size) and otherwise skips only layers with a dim < 16.

Other deliberate differences: ``custom_layers`` without a custom type is a :class:`ConfigError`
when the config is built (the reference crashed on the first match); a layer config ``_default``
no longer switches the presets off; ``simple`` is inherited by fallback and custom layers unless
their own ``simple`` flag is set (the reference forced learned rounding on them).
"""

from __future__ import annotations

import re
import types
from typing import Any, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import attrs
import torch

from ._validators import one_of as _one_of
from ._validators import optional_positive_int as _opt_positive_int
from ._validators import positive_int as _positive_int
from .config import SCALING_MODES
from .errors import ConfigError
from .io.layer_config import load_layer_config, match_layer_config
from .presets import PRESETS, Preset

__all__ = [
    "SCALING_MODES",
    "TARGETS",
    "HEUR_MIN_DIM",
    "LayerOverride",
    "Decision",
    "SelectionConfig",
    "decide",
    "iter_decisions",
    "why_not_candidate",
    "is_candidate",
    "inefficiency",
    "tensor_triples",
]

TARGETS = ("int8", "fp16", "fp8")  # fp8: ComfyUI float8_e4m3fn (per-tensor scale)
ACTIONS = ("quantize", "keep", "remove")
#: ``--heur`` keeps layers with a dim below this in tensor/row/axis modes (int8 GEMMs that small
#: gain nothing over the float path).
HEUR_MIN_DIM = 16


def _bool(instance, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name}={value!r} must be True or False")


@attrs.frozen
class LayerOverride:
    """Settings for the layers ``custom_layers`` selects (the reference's ``custom_*`` options).

    Example:
        >>> LayerOverride("int8", scaling_mode="block", block_size=64)
        LayerOverride(type='int8', block_size=64, scaling_mode='block', simple=False, heur=False)
    """

    type: str = attrs.field(validator=_one_of(TARGETS, what="custom type"))
    block_size: int | None = attrs.field(default=None, validator=_opt_positive_int)
    scaling_mode: str | None = attrs.field(default=None, validator=_one_of(SCALING_MODES, optional=True,
                                                                             what="custom scaling_mode"))
    simple: bool = attrs.field(default=False, validator=_bool)
    heur: bool = attrs.field(default=False, validator=_bool)


@attrs.frozen
class Decision:
    """What to do with one tensor, and why.

    ``action`` is ``"quantize"``, ``"keep"`` (copy unchanged) or ``"remove"`` (drop from the
    output). For ``"quantize"``, ``target`` is ``"int8"`` or ``"fp16"`` and the optional
    overrides (``None``: use the global setting) are ``scaling_mode``, ``block_size``, ``simple``
    and ``full_precision_matrix_mult``. ``reason`` is a short human string for the report;
    ``rule`` names the rule that decided (``remove``, ``not_candidate``, ``empty``,
    ``layer_config``, ``custom``, ``exclude``, ``preset``, ``layer_config_default``, ``default``,
    ``heur``).
    """

    action: str = attrs.field(validator=_one_of(ACTIONS, what="action"))
    target: str | None = attrs.field(default=None)
    reason: str = ""
    rule: str = ""
    scaling_mode: str | None = None
    block_size: int | None = None
    simple: bool | None = None
    full_precision_matrix_mult: bool | None = None

    @target.validator
    def _target(self, attribute, value):
        if self.action == "quantize" and value not in TARGETS:
            raise ConfigError(f"a quantize decision needs target in {list(TARGETS)}, got {value!r}")
        if self.action != "quantize" and value is not None:
            raise ConfigError(f"a {self.action!r} decision has no target, got {value!r}")

    @property
    def quantize(self) -> bool:
        return self.action == "quantize"


# ---------------------------------------------------------------------------------------------
# Config


def _presets(value: Any) -> tuple[str, ...]:
    """Preset names (in the registry's order) from a filter_flags dict, a name or an iterable."""
    if value is None:
        return ()
    if isinstance(value, str):
        names = [value]
    elif isinstance(value, Mapping):
        unknown = [k for k in value if k not in PRESETS]
        if unknown:
            raise ConfigError(f"unknown preset(s) {unknown} in filter_flags; valid presets are {list(PRESETS)}")
        odd = {k: v for k, v in value.items() if not isinstance(v, bool)}
        if odd:
            raise ConfigError(f"filter_flags values must be True or False, got {odd}; e.g. {{'flux2': True}}")
        names = [k for k, on in value.items() if on]
    elif isinstance(value, (list, tuple, set, frozenset)):
        names = [p.name if isinstance(p, Preset) else p for p in value]
    else:
        raise ConfigError(f"presets/filter_flags must be a dict of booleans ({{'flux2': True}}), a preset name or a "
                          f"list of names, got {type(value).__name__} {value!r}")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown preset(s) {unknown}; valid presets are {list(PRESETS)}")
    return tuple(n for n in PRESETS if n in names)


def _regex_option(option: str):
    def convert(value):
        # The reference tests these options for truthiness, so "" means "not set" (not "match all").
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{option} must be a regex string, got {type(value).__name__} {value!r}")
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(f"{option}={value!r} is not a valid regular expression ({e}); "
                              "fix the pattern (escape literal dots and brackets with a backslash)") from None
        return value

    return convert


def _layer_config(value: Any) -> Mapping[str, Any] | None:
    if value is None:
        return None
    return types.MappingProxyType(load_layer_config(value))


def _custom(value: Any) -> LayerOverride | None:
    if value is None or isinstance(value, LayerOverride):
        return value
    if isinstance(value, str):
        return LayerOverride(value)
    if isinstance(value, Mapping):
        return LayerOverride(**value)
    raise ConfigError(f"custom must be a LayerOverride, a type name ('int8'/'fp16') or a dict, got {value!r}")


@attrs.frozen
class SelectionConfig:
    """Everything :func:`decide` needs (the reference's filter and override options).

    Args:
        target: global target, ``"int8"`` or ``"fp16"`` (``--fp16``).
        scaling_mode: global scaling mode (``tensor``/``row``/``axis``/``block``); only used by
            ``--heur`` here.
        presets: active preset names; also accepts a ``filter_flags`` dict ``{name: bool}``.
        exclude_layers: regex; matching layers are kept (or use ``fallback``).
        custom_layers: regex; matching layers use ``custom`` (required when this is set).
        custom: a :class:`LayerOverride` (or ``"int8"``/``"fp16"``, or a dict of its fields); without
            ``custom_layers`` it selects nothing (as in the reference).
        fallback: ``"int8"``/``"fp16"`` for layers that ``exclude_layers`` or a preset would keep.
        fallback_block_size, fallback_simple: settings of the fallback layers.
        layer_config: a layer config (path, raw dict or :func:`~cq.io.layer_config.load_layer_config`
            result); ``layer_config_fullmatch`` uses ``re.fullmatch`` for its patterns.
        skip_inefficient_layers: ``--heur``; ``heur_block_size`` is the global block size it uses
            for block-mode layers without their own.

    Example:
        >>> cfg = SelectionConfig(presets={"wan": True, "t5xxl": False}, exclude_layers=r"head")
        >>> cfg.presets
        ('wan',)
        >>> SelectionConfig(exclude_layers="blocks[")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cq.errors.ConfigError: exclude_layers='blocks[' is not a valid regular expression (unterminated ...
    """

    target: str = attrs.field(default="int8", validator=_one_of(TARGETS, what="target"))
    scaling_mode: str = attrs.field(default="row", validator=_one_of(SCALING_MODES, what="scaling_mode"))
    presets: tuple[str, ...] = attrs.field(default=(), converter=_presets)
    exclude_layers: str | None = attrs.field(default=None, converter=_regex_option("exclude_layers"))
    custom_layers: str | None = attrs.field(default=None, converter=_regex_option("custom_layers"))
    custom: LayerOverride | None = attrs.field(default=None, converter=_custom)
    fallback: str | None = attrs.field(default=None, validator=_one_of(TARGETS, optional=True, what="fallback"))
    fallback_block_size: int | None = attrs.field(default=None, validator=_opt_positive_int)
    fallback_simple: bool = attrs.field(default=False, validator=_bool)
    layer_config: Mapping[str, Any] | None = attrs.field(default=None, converter=_layer_config, hash=False,
                                                          repr=lambda c: "None" if c is None else
                                                          f"<{sum(1 for k in c if not k.startswith('_'))} patterns>")
    layer_config_fullmatch: bool = attrs.field(default=False, validator=_bool)
    skip_inefficient_layers: bool = attrs.field(default=False, validator=_bool)
    heur_block_size: int = attrs.field(default=128, validator=_positive_int)

    def __attrs_post_init__(self):
        if self.custom_layers is not None and self.custom is None:
            raise ConfigError(f"custom_layers={self.custom_layers!r} needs a custom type: pass custom_type "
                              "'int8' or 'fp16' (CLI: --custom-type int8)")

    @classmethod
    def from_legacy(cls, *, filter_flags: Mapping[str, bool] | None = None, fp16: bool = False, fp8: bool = False,
                    fallback: str | None = None, custom_layers: str | None = None,
                    exclude_layers: str | None = None, custom_type: str | None = None,
                    custom_block_size: int | None = None, custom_scaling_mode: str | None = None,
                    custom_simple: bool = False, custom_heur: bool = False,
                    fallback_block_size: int | None = None, fallback_simple: bool = False,
                    skip_inefficient_layers: bool = False, layer_config: Any = None,
                    layer_config_fullmatch: bool = False, scaling_mode: str | None = None,
                    block_size: int | None = None) -> "SelectionConfig":
        """Build a config from ``convert_to_int8``'s selection parameters (same names and meaning).

        Pass the run's ``fp16``, ``scaling_mode`` and ``block_size`` too: the first sets the
        target of the default decisions, the other two drive ``--heur`` (``None``: row, 128).

        Example:
            >>> cfg = SelectionConfig.from_legacy(filter_flags={"wan": True}, custom_layers="attn",
            ...                                   custom_type="fp16", custom_heur=True)
            >>> cfg.presets, cfg.custom.type, cfg.custom.heur
            (('wan',), 'fp16', True)
        """
        custom = None
        if custom_type is not None:
            custom = LayerOverride(custom_type, block_size=custom_block_size, scaling_mode=custom_scaling_mode,
                                   simple=bool(custom_simple), heur=bool(custom_heur))
        if fp16 and fp8:
            raise ConfigError("fp16=True and fp8=True both set the target of every layer; choose one "
                              "(per-layer formats go in a layer config)")
        return cls(target="fp16" if fp16 else ("fp8" if fp8 else "int8"), scaling_mode=scaling_mode or "row",
                   presets=filter_flags,
                   exclude_layers=exclude_layers, custom_layers=custom_layers, custom=custom, fallback=fallback,
                   fallback_block_size=fallback_block_size, fallback_simple=bool(fallback_simple),
                   layer_config=layer_config, layer_config_fullmatch=bool(layer_config_fullmatch),
                   skip_inefficient_layers=bool(skip_inefficient_layers),
                   heur_block_size=128 if block_size is None else block_size)

    @property
    def active_presets(self) -> tuple[Preset, ...]:
        return tuple(PRESETS[n] for n in self.presets)


# ---------------------------------------------------------------------------------------------
# Tensor-level predicates


#: Module names of lookup tables: ``word_embeddings``, ``position_embedding``, ``embed_tokens``,
#: ``wte``/``wpe``, a top-level ``shared`` (T5), ``token_embedding``. Linear "embedders" (``x_embedder``,
#: ``time_embedding.0``) do not match: their last component is not an embedding-table name.
_EMBEDDING_TABLE = re.compile(r"(^|\.)([a-z_]*embeddings?|embed_tokens|wte|wpe)$|^shared$")


def why_not_candidate(key: str, shape: Iterable[int], dtype: torch.dtype | None) -> str | None:
    """Why ``key`` is never quantized (a short reason), or ``None`` if it is a candidate.

    A candidate is a 2-D floating-point (not float8) tensor whose key ends in ``.weight``;
    ``dtype=None`` means "unknown, assume floating point".

    Example:
        >>> why_not_candidate("blk.0.fc.weight", (8, 8), torch.bfloat16) is None
        True
        >>> why_not_candidate("blk.0.conv.weight", (8, 8, 3, 3), torch.float16)
        'not a 2-D .weight (4-D)'
        >>> why_not_candidate("embeddings.word_embeddings.weight", (30522, 384), torch.float32)
        'embedding table (not a Linear layer)'
    """
    shape = tuple(shape)
    if not key.endswith(".weight"):
        return "not a .weight tensor"
    if len(shape) != 2:
        return f"not a 2-D .weight ({len(shape)}-D)"
    if _EMBEDDING_TABLE.search(key[: -len(".weight")]):
        # Lookup tables are not Linear layers: ComfyUI runs int8 only in Linear (and, from 0.29 on,
        # in its own Embedding op), so a quantized table would load as raw integers elsewhere.
        return "embedding table (not a Linear layer)"
    if dtype is not None:
        if not dtype.is_floating_point:
            return f"not floating point ({str(dtype).replace('torch.', '')})"
        if dtype.itemsize == 1:
            return f"already 8-bit ({str(dtype).replace('torch.', '')})"
    return None


def is_candidate(key: str, shape: Iterable[int], dtype: torch.dtype | None) -> bool:
    """Whether ``key`` could be quantized at all (see :func:`why_not_candidate`)."""
    return why_not_candidate(key, shape, dtype) is None


def inefficiency(shape: tuple[int, int], scaling_mode: str | None, block_size: int) -> str | None:
    """Why ``--heur`` keeps a layer of ``shape`` in ``scaling_mode``, or ``None`` to quantize it.

    Example:
        >>> inefficiency((3072, 1000), "row", 128) is None, inefficiency((3072, 1000), "block", 128)
        (True, '3072×1000 not divisible by block 128')
        >>> inefficiency((8, 1024), "row", 128)
        '8×1024 has a dim < 16'
    """
    n, k = shape
    if scaling_mode == "block":
        if n < block_size or k < block_size:
            return f"{n}×{k} smaller than block {block_size}"
        if n % block_size or k % block_size:
            return f"{n}×{k} not divisible by block {block_size}"
        return None
    if n < HEUR_MIN_DIM or k < HEUR_MIN_DIM:
        return f"{n}×{k} has a dim < {HEUR_MIN_DIM}"
    return None


def _entry_decision(entry: Mapping[str, Any], reason: str, rule: str) -> Decision:
    if entry.get("skip"):
        return Decision("keep", reason=f"{reason}: skip", rule=rule)
    return Decision(
        "quantize",
        target={"fp16": "fp16", "float8_e4m3fn": "fp8", "fp8": "fp8"}.get(entry["format"], "int8"),
        reason=reason,
        rule=rule,
        scaling_mode=entry.get("scaling_mode"),
        block_size=entry.get("block_size"),
        simple=entry.get("simple"),
        full_precision_matrix_mult=entry.get("full_precision_matrix_mult"),
    )


def _kept(cfg: SelectionConfig, reason: str, rule: str) -> Decision:
    if cfg.fallback is None:
        return Decision("keep", reason=reason, rule=rule)
    return Decision("quantize", target=cfg.fallback, reason=f"{reason} → fallback {cfg.fallback}", rule=rule,
                    block_size=cfg.fallback_block_size, simple=True if cfg.fallback_simple else None)


def _claim(key: str, cfg: SelectionConfig) -> Decision:
    """The decision for a candidate before the ``--heur`` check."""
    if cfg.layer_config is not None:
        hit = match_layer_config(key, cfg.layer_config, cfg.layer_config_fullmatch)
        if hit is not None:
            return _entry_decision(hit[1], f"layer_config {hit[0]!r}", "layer_config")
    if cfg.custom_layers is not None and re.search(cfg.custom_layers, key):
        c = cfg.custom
        return Decision("quantize", target=c.type, reason="custom_layers", rule="custom",
                        scaling_mode=c.scaling_mode, block_size=c.block_size, simple=True if c.simple else None)
    if cfg.exclude_layers is not None and re.search(cfg.exclude_layers, key):
        return _kept(cfg, "exclude_layers", "exclude")
    for preset in cfg.active_presets:
        sub = preset.keeps(key)
        if sub is not None:
            return _kept(cfg, f"preset {preset.name}: {sub}", "preset")
    if cfg.layer_config is not None:
        default = cfg.layer_config.get("_default")
        if default is not None:
            return _entry_decision(default, "layer_config _default", "layer_config_default")
    return Decision("quantize", target=cfg.target, reason="default", rule="default")


def decide(key: str, shape: Iterable[int], dtype: torch.dtype | None,
           cfg: SelectionConfig = SelectionConfig()) -> Decision:
    """Decide what happens to the tensor ``key`` of ``shape`` and ``dtype`` (rules: module docstring).

    Example:
        >>> cfg = SelectionConfig(presets=("wan",), fallback="fp16")
        >>> decide("blocks.0.ffn.0.weight", (64, 32), torch.bfloat16, cfg).action
        'quantize'
        >>> d = decide("head.head.weight", (64, 32), torch.bfloat16, cfg)
        >>> d.target, d.reason
        ('fp16', 'preset wan: head.head → fallback fp16')
        >>> decide("blocks.0.norm3.bias", (64,), torch.bfloat16, cfg).reason
        'not a .weight tensor'
    """
    shape = tuple(int(d) for d in shape)
    for preset in cfg.active_presets:
        sub = preset.removes(key)
        if sub is not None:
            return Decision("remove", reason=f"preset {preset.name}: removes {sub!r}", rule="remove")
    why = why_not_candidate(key, shape, dtype)
    if why is not None:
        return Decision("keep", reason=why, rule="not_candidate")
    if 0 in shape:
        return Decision("keep", reason="empty tensor", rule="empty")
    d = _claim(key, cfg)
    if not d.quantize or "lora_" in key:
        return d
    heur = cfg.custom.heur if d.rule == "custom" else cfg.skip_inefficient_layers
    if heur:
        mode = None if d.target in ("fp16", "fp8") else (d.scaling_mode or cfg.scaling_mode)
        why = inefficiency(shape, mode, d.block_size or cfg.heur_block_size)
        if why is not None:
            return Decision("keep", reason=f"{d.reason}; --heur: {why}", rule="heur")
    return d


# ---------------------------------------------------------------------------------------------
# Iterating over a file


@runtime_checkable
class _ShapeSource(Protocol):
    def keys(self) -> Iterable[str]: ...

    def get_shape(self, key: str) -> Iterable[int]: ...


@runtime_checkable
class _DtypeSource(_ShapeSource, Protocol):
    def get_dtype(self, key: str) -> torch.dtype: ...


def tensor_triples(source: Any) -> Iterator[tuple[str, tuple[int, ...], torch.dtype | None]]:
    """``(key, shape, dtype)`` for every tensor of ``source``, without loading tensor data.

    ``source`` is a loader (``keys()``, ``get_shape(key)`` and, if it has it, ``get_dtype(key)``;
    without it the dtype is ``None``), a mapping of names to tensors (a state dict), or an
    iterable of ``(key, shape, dtype)`` triples.

    Example:
        >>> list(tensor_triples({"fc.weight": torch.zeros(2, 3)}))
        [('fc.weight', (2, 3), torch.float32)]
    """
    if isinstance(source, Mapping):
        for key, t in source.items():
            yield key, tuple(t.shape), t.dtype
    elif isinstance(source, _ShapeSource):
        has_dtype = isinstance(source, _DtypeSource)
        for key in source.keys():
            yield key, tuple(source.get_shape(key)), source.get_dtype(key) if has_dtype else None
    else:
        for key, shape, dtype in source:
            yield key, tuple(shape), dtype


def iter_decisions(loader_like: Any, cfg: SelectionConfig = SelectionConfig()) -> Iterator[tuple[str, Decision]]:
    """``(key, Decision)`` for every tensor of ``loader_like`` (see :func:`tensor_triples`), in its order.

    Example:
        >>> triples = [("fc.weight", (32, 32), torch.float32), ("fc.bias", (32,), torch.float32)]
        >>> [(k, d.action) for k, d in iter_decisions(triples)]
        [('fc.weight', 'quantize'), ('fc.bias', 'keep')]
    """
    for key, shape, dtype in tensor_triples(loader_like):
        yield key, decide(key, shape, dtype, cfg)
