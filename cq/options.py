"""The one table behind the facade and the CLI: every option, where it goes, its flags, type and help.

Each :class:`Option` names its destination explicitly (``target``):

* ``config.<field>`` — a :class:`~cq.config.ConvertConfig` field;
* ``selection.<arg>`` — an argument of :meth:`cq.selection.SelectionConfig.from_legacy`;
* ``recipe.<arg>`` — an input of the recipe choice (``optimizer``, ``scaling_mode``, ``block_size``);
* ``gptq.<field>`` — a :class:`~cq.transforms.gptq.GPTQConfig` field (``optimizer="gptq"`` only);
* ``quip.<arg>`` — an argument of :func:`~cq.transforms.quip.quip_config_from_legacy` (``optimizer="quip"`` only);
* ``lora.<field>`` — the LoRA merge (``config.merge_loras`` and friends);
* ``file.<role>`` — the input and output paths; ``report.<kind>`` — extra reports written after the run;
* ``cli.<name>`` — options only the command line has (and ``report_quality``, which logs the table);
* ``noop`` — accepted, with the reason it changes nothing (logged when set);

:func:`build_config` turns ``{option name: value}`` into ``(input, output, ConvertConfig)`` and rejects
combinations that cannot apply; :func:`add_cli_options` builds the argparse flags from the same rows.

Example:
    >>> _, _, cfg = build_config({"input_file": "a.safetensors", "output_file": "b.safetensors",
    ...     "comfy_quant": True, "filter_flags": {}, "calib_samples": 64, "seed": 1, "optimizer": "gptq"})
    >>> type(cfg.recipe).__name__, cfg.seed
    ('GPTQ', 1)
"""

from __future__ import annotations

import argparse
import logging
import warnings
from typing import Any, Iterable, Mapping

import attrs

from .config import DEVICE_CHOICES, SCALING_MODES, ConvertConfig, granularity_for
from .errors import ConfigError
from .presets import PRESETS
from .recipes import GPTQ, RTN, LearnedRound, QuIP

__all__ = ["Option", "OPTIONS", "FACADE_PARAMETERS", "CONVERTER_KWARGS", "REQUIRED", "build_config",
           "add_cli_options", "values_from_cli", "OPTIMIZERS", "STREAMING_MODES"]

log = logging.getLogger("cq.options")

REQUIRED = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()
OPTIMIZERS = ("rtn", "gptq", "quip", "original", "adamw", "radam")
LEARNED_ROUNDING = ("original", "adamw", "radam")
STREAMING_MODES = ("off", "minimal", "balanced", "aggressive", "auto")


@attrs.frozen
class Option:
    """One option of the facade and/or the CLI.

    ``name``: the facade keyword (the reference's name) and the argparse dest. ``facade``: ``"param"``
    (a named parameter of ``convert_to_int8``), ``"kwarg"`` (one of its ``**converter_kwargs``) or
    ``None`` (CLI only). ``flags``: CLI spellings (empty: not on the CLI); the dash/underscore twin of
    each long flag is added automatically. ``cli``: extra ``add_argument`` keywords (``action``,
    ``nargs``, ``type``, ``choices``, ``default`` when the CLI's differs). ``why``: for ``noop`` the
    reason it has no effect.
    """

    name: str
    target: str
    default: Any = None
    facade: str | None = "param"
    flags: tuple[str, ...] = ()
    help: str | None = None
    group: str = "run"
    cli: Mapping[str, Any] = attrs.field(factory=dict)
    why: str = ""

    @property
    def kind(self) -> str:
        return self.target.split(".", 1)[0]

    @property
    def field(self) -> str:
        return self.target.split(".", 1)[1]


def _shrink_value(value):
    """``--hessian-shrink``: ``auto`` or a number in [0, 1] (the recipe record validates the range)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"hessian_shrink={value!r} must be 'auto' or a number in [0, 1], e.g. 0.3") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"hessian_shrink={value!r} must be 'auto' or a number in [0, 1], e.g. 0.3")
    return float(value)


def _opt(name, target, value=None, *flags, facade="param", help=None, group="run", why="", **cli):
    """A row: ``value`` is the facade default; ``cli`` keywords (``default`` too) go to add_argument."""
    return Option(name, target, value, facade, tuple(flags), help, group, dict(cli), why)


_ONOFF = argparse.BooleanOptionalAction

#: Every option, the reference's 50 facade parameters first and in its order.
OPTIONS: tuple[Option, ...] = (
    _opt("input_file", "file.input", REQUIRED, "-i", "--input", help="input .safetensors file", group="files",
         required=True, dest="input"),
    _opt("output_file", "file.output", REQUIRED, "-o", "--output", group="files", dest="output",
         help="output file (default: an automatic name next to the input that says what ran)"),
    _opt("comfy_quant", "config.comfy", REQUIRED, "--comfy_quant", group="output format", action="store_true",
         default=True, help="ComfyUI format with .comfy_quant tensors (the default; kept for the reference's scripts)"),
    _opt("filter_flags", "selection.filter_flags", REQUIRED, group="which layers"),
    _opt("calib_samples", "config.calib_samples", REQUIRED, "--calib_samples", group="rounding", type=int,
         default=6144, help="rows of synthetic calibration data (--calibration-lora)"),
    _opt("seed", "config.seed", REQUIRED, group="rounding"),
    _opt("fp16", "selection.fp16", False, "--fp16", group="output format", action="store_true",
         help="store eligible weights as float16 instead of INT8"),
    _opt("fallback", "selection.fallback", None, "--fallback", group="which layers", choices=["int8", "fp16"],
         help="format for excluded/preset-kept layers"),
    _opt("custom_layers", "selection.custom_layers", None, "--custom-layers", group="which layers",
         help="regex: layers converted with the --custom-* settings"),
    _opt("exclude_layers", "selection.exclude_layers", None, "--exclude-layers", group="which layers",
         help="regex (re.search on the key): keep these layers"),
    _opt("custom_type", "selection.custom_type", None, "--custom-type", group="which layers", choices=["int8", "fp16"]),
    _opt("custom_block_size", "selection.custom_block_size", None, "--custom-block-size", group="which layers",
         type=int),
    _opt("custom_scaling_mode", "selection.custom_scaling_mode", None, "--custom-scaling-mode", group="which layers",
         choices=list(SCALING_MODES)),
    _opt("custom_simple", "selection.custom_simple", False, "--custom-simple", group="which layers",
         action="store_true"),
    _opt("custom_heur", "selection.custom_heur", False, "--custom-heur", group="which layers", action="store_true"),
    _opt("fallback_block_size", "selection.fallback_block_size", None, "--fallback-block-size", group="which layers",
         type=int),
    _opt("fallback_simple", "selection.fallback_simple", False, "--fallback-simple", group="which layers",
         action="store_true"),
    _opt("full_precision_matrix_mult", "config.full_precision_matrix_mult", False, "--full_precision_matrix_mult",
         group="output format", action="store_true", help="mark every layer full_precision_matrix_mult in .comfy_quant"),
    _opt("skip_inefficient_layers", "selection.skip_inefficient_layers", False, "--heur", group="which layers",
         action="store_true", help="skip layers too small (or not tileable by the block size) to benefit"),
    _opt("include_input_scale", "config.include_input_scale", False, "--input_scale", group="output format",
         action="store_true", help="legacy format only: write scale_input = 1"),
    _opt("no_learned_rounding", "noop", False, "--simple", group="rounding", action="store_true",
         why="cq runs learned rounding only when an optimizer asks for it",
         help="no learned rounding (cq never runs it unasked)"),
    _opt("save_quant_metadata", "config.save_quant_metadata", False, "--save-quant-metadata", group="output format",
         action="store_true", help="also write the _quantization_metadata header (same entries as .comfy_quant)"),
    _opt("layer_config", "selection.layer_config", None, "--layer-config", group="which layers",
         help="per-layer JSON config (regex keys)"),
    _opt("layer_config_fullmatch", "selection.layer_config_fullmatch", False, "--fullmatch", group="which layers",
         action="store_true", help="match --layer-config patterns with re.fullmatch"),
    _opt("low_memory", "config.low_memory", False, "--low-memory", action="store_true",
         help="read each tensor from disk on demand"),
    _opt("streaming_mode", "config.streaming_mode", "balanced", "--streaming-mode", choices=list(STREAMING_MODES),
         help="any mode but 'off' reads tensors lazily from disk (cq holds one layer at a time)"),
    _opt("streaming_thresholds", "config.streaming_thresholds", None,
         help="per-key overrides of the tier's GPU offload thresholds (hadamard_elements, hessian_dim, ldlq_dim, "
              "ortho_dim)"),
    _opt("no_memory_limits", "noop", False, "--no-memory-limits", action="store_true",
         why="cq has no memory guard to disable: it processes one layer at a time"),
    _opt("report_quality", "cli.report_quality", False, "--report-quality", action="store_true",
         help="log the per-layer quality table (the CLI always prints it)"),
    _opt("quality_threshold", "config.quality_threshold", 30.0, "--quality-threshold", type=float,
         help="SQNR (dB) under which a layer is listed as below threshold"),
    _opt("smoothquant", "config.smoothquant", False, "--smoothquant", group="rounding", action="store_true",
         help="exact smoothing folds (adaLN modulation -> Linear, V -> O, gated MLP, pre-norm affine norms) from "
              "--calibration-data; changes two layers jointly: runtime LoRAs on folded layers no longer match"),
    _opt("smoothquant_alpha", "config.smoothquant_alpha", 0.5, "--smoothquant-alpha", group="rounding", type=float,
         default=None, help="fix SmoothQuant's alpha (default: searched per mapping against the W8A8 error)"),
    _opt("calibration_data_path", "config.calibration_path", None, "--calibration-data", group="rounding",
         help="calibration file (cq format from `cq.calibrate`, or the reference's .json/.safetensors)"),
    _opt("calibration_lora_path", "config.calibration_lora_path", None, "--calibration-lora", group="rounding",
         help="LoRA rows for the reference's synthetic Hessians (not data-aware)"),
    _opt("gptq_actorder", "gptq.actorder", False, "--gptq-actorder", group="rounding", action="store_true",
         help="GPTQ: quantize columns by decreasing Hessian diagonal"),
    _opt("gptq_fast", "gptq.lazy_batch", True, "--gptq-fast", group="rounding", action=_ONOFF,
         help="GPTQ: lazy block updates (off: the textbook loop; same codes, slower)"),
    _opt("gptq_turbo", "gptq.turbo", False, "--gptq-turbo", group="rounding", action="store_true",
         help="accepted; cq has no Triton GPTQ kernel (warns)"),
    _opt("quip_actorder", "quip.actorder", True, "--quip-actorder", group="rounding", action=_ONOFF),
    _opt("quip_hadamard", "quip.hadamard", True, "--quip-hadamard", group="rounding", action=_ONOFF),
    _opt("quip_seed", "quip.seed", None, "--quip-seed", group="rounding", type=int,
         help="seed of the two-sided transform (requant/transformed outputs only)"),
    _opt("quip_store_transformed", "quip.store_transformed", False, "--quip-store-transformed", group="rounding",
         action="store_true"),
    _opt("quip_requant_scheme", "quip.requant_scheme", "tensor", "--quip-requant-scheme", group="rounding",
         choices=["tensor", "block"]),
    _opt("quip_requant_tensor_per_row", "quip.requant_tensor_per_row", True, "--quip-requant-tensor-per-row",
         group="rounding", action=_ONOFF),
    _opt("quip_checkpointed", "quip.checkpointed", False, "--quip-checkpointed", group="rounding",
         action="store_true"),
    _opt("quip_checkpoint_threshold", "quip.checkpoint_threshold", 8192, "--quip-checkpoint-threshold",
         group="rounding", type=int),
    _opt("quip_checkpoint_segments", "quip.checkpoint_segments", 4, "--quip-checkpoint-segments", group="rounding",
         type=int),
    _opt("merge_lora_path", "lora.path", None, "--merge-lora", group="LoRA merging",
         help="merge this LoRA into the weights before quantizing (ComfyUI's arithmetic)"),
    _opt("merge_lora_paths", "lora.paths", None, "--merge-loras", group="LoRA merging", nargs="+",
         help="merge several LoRAs, in order"),
    _opt("merge_lora_scale", "lora.scale", 1.0, "--merge-lora-scale", group="LoRA merging", type=float,
         help="strength of every merged LoRA"),
    _opt("merge_lora_dampen", "lora.dampen", True, "--merge-lora-dampen", group="LoRA merging", action=_ONOFF,
         help="scale the i-th LoRA (from 0) by 0.9**i, as the reference does"),
    # ---- the reference's **converter_kwargs, and cq's own run options
    _opt("optimizer", "recipe.optimizer", None, "--optimizer", facade="kwarg", group="rounding",
         choices=list(OPTIMIZERS), help="rtn (default), gptq, quip; original/adamw/radam: learned rounding from "
                                        "LDLQ (never better than LDLQ at INT8 on held-out data; see the README)"),
    _opt("scaling_mode", "recipe.scaling_mode", None, "--scaling_mode", facade="kwarg", group="output format",
         choices=list(SCALING_MODES), help="scale layout: row (default, [N,1]), axis (= row), tensor (()), block "
                                           "(int8_blockwise tiles, custom nodes only)"),
    _opt("block_size", "recipe.block_size", None, "--block_size", facade="kwarg", group="output format", type=int,
         help="tile size for --scaling_mode block (128), or the group of --quip-requant-scheme block"),
    _opt("hessian_shrink", "recipe.hessian_shrink", None, "--hessian-shrink", facade="kwarg", group="rounding",
         type=_shrink_value, help="GPTQ/QuIP: shrink the calibration Hessian toward its diagonal by this weight "
                                  "(default auto: min(0.3, 0.7·K/T) for T calibration tokens, measured better on "
                                  "held-out data; 0: the published algorithms)"),
    _opt("upstream_strength", "recipe.upstream_strength", None, "--upstream-strength", facade="kwarg",
         group="rounding", type=float,
         help="GPTQ/QuIP with a sequential calibration file (cq.sequential.capture_sequential): fraction of the "
              "step toward the float model's output, compensating the earlier layers' rounding (default 0.5, "
              "measured on held-out data; 0: off). Files without upstream statistics run the published algorithms"),
    _opt("strict_hessian", "config.strict_hessian", False, "--strict-hessian", facade="kwarg", group="rounding",
         action="store_true", help="a calibration Hessian that is non-finite, zero or not positive-definite stops the "
                                   "run (default: that layer is rounded to nearest, with a warning)"),
    _opt("bias_correction", "config.bias_correction", False, "--bias-correction", facade="kwarg", group="rounding",
         action="store_true", help="fold each layer's expected output error into its existing bias (needs "
                                   "--calibration-data with input means; layers without a bias are left alone)"),
    _opt("fp8", "selection.fp8", False, "--fp8", facade="kwarg", group="output format", action="store_true",
         help="store eligible weights as ComfyUI float8_e4m3fn (per-tensor scale; Ada/Hopper) instead of INT8; "
              "per layer: \"format\": \"float8_e4m3fn\" in --layer-config"),
    _opt("fp8_input_scale", "config.fp8_input_scale", False, "--fp8-input-scale", facade="kwarg",
         group="output format", action="store_true",
         help="FP8 layers also get a static input_scale from the calibration absmax (needs --calibration-data)"),
    _opt("requantize_int8", "config.requantize_int8", False, "--requantize-int8", facade="kwarg", group="files",
         action="store_true", help="re-quantize layers that are already ComfyUI int8 (default: copied unchanged; "
                                   "re-quantizing adds a second rounding error)"),
    _opt("auto_preset", "config.auto_preset", True, "--auto-preset", facade="kwarg", group="which layers",
         action=_ONOFF, help="apply the preset of the architecture recognised from the tensor names (default on; "
                             "--no-auto-preset: generic rules unless a preset flag is given)"),
    _opt("report_html", "report.html", None, "--report-html", facade="kwarg", group="files",
         help="also write a self-contained HTML quality report (charts; needs the [report] extra: matplotlib)"),
    _opt("legacy_axiswise", "config.legacy_axiswise", False, "--legacy-axiswise", facade="kwarg",
         group="output format", action="store_true",
         help="write per-row scales as [N] 'int8_axiswise' for the fork's custom nodes (vanilla ComfyUI fails)"),
    _opt("metrics_tokens", "config.metrics_tokens", 64, facade="kwarg"),
    _opt("backend", "config.backend", "auto", "--backend", facade="kwarg", choices=["auto", "torch", "triton"],
         help="kernel backend (triton needs CUDA, or TRITON_INTERPRET=1 on the CPU)"),
    _opt("device", "config.device", "auto", "--device", facade="kwarg",
         help=f"where layers are computed: {', '.join(DEVICE_CHOICES)} (auto: CUDA when available)"),
    *(_opt(n, f"learned.{n}", None, f"--{n}", facade="kwarg", group="rounding",
           help=f"learned rounding (optimizer original/adamw/radam): {n}")
      for n in ("num_iter", "lr", "lr_schedule", "top_p", "min_k", "max_k", "lr_gamma", "lr_patience", "lr_factor",
                "lr_min", "lr_cooldown", "lr_threshold", "lr_adaptive_mode", "lr_shape_influence",
                "lr_threshold_mode", "early_stop_loss", "early_stop_lr", "early_stop_stall")),
    _opt("full_matrix", "learned.full_matrix", None, "--full_matrix", facade="kwarg", group="rounding",
         action="store_true", default=None, help="learned rounding: the data-free objective on the full matrix"),
    # ---- CLI only
    _opt("legacy_format", "cli.legacy_format", False, "--legacy-format", facade=None, group="output format",
         action="store_true", help="the reference's non-comfy layout (.scale_weight); vanilla ComfyUI loads it "
                                   "unquantized"),
    _opt("int8", "noop", False, "--int8", facade=None, group="output format", action="store_true",
         why="INT8 is the default target", help="INT8 target (the default)"),
    _opt("manual_seed", "cli.manual_seed", -1, "--manual_seed", facade=None, group="rounding", type=int,
         help="seed (-1: 0; cq is always deterministic)"),
    *(_opt(name, "cli.preset", False, f"--{name}", facade=None, group="which layers", action="store_true",
           help=f"model preset: keep {name}'s sensitive layers") for name in PRESETS),
    _opt("report_json", "cli.report_json", None, "--report-json", facade=None, group="files",
         help="also write the per-layer report as JSON to this path"),
    _opt("verbose", "cli.verbose", "NORMAL", "--verbose", facade=None, choices=["DEBUG", "VERBOSE", "NORMAL", "MINIMAL"],
         help="MINIMAL: only warnings and the one-line summary"),
    _opt("no_progress", "cli.no_progress", False, "--no-progress", facade=None, action="store_true"),
    _opt("dry_run", "cli.dry_run", None, "--dry-run", facade=None, nargs="?", const="analyze",
         choices=["analyze", "create-template"],
         help="analyze: print what would happen to every tensor and write nothing; create-template: write "
              "<input>_layer_config_template.json (a loadable --layer-config) and exit"),
)

_BY_NAME = {o.name: o for o in OPTIONS}
#: The facade's named parameters (the reference's 50) and its accepted ``**converter_kwargs``, in order.
FACADE_PARAMETERS: dict[str, Option] = {o.name: o for o in OPTIONS if o.facade == "param"}
CONVERTER_KWARGS: dict[str, Option] = {o.name: o for o in OPTIONS if o.facade == "kwarg"}


def _is_default(opt: Option, value: Any) -> bool:
    return value is None or (opt.default is not REQUIRED and value == opt.default)


def build_config(values: Mapping[str, Any]) -> tuple[str, str, ConvertConfig]:
    """``(input, output, ConvertConfig)`` from option values keyed by option name.

    Every combination that cannot apply is a ConfigError here, before any file is read.
    """
    from .selection import SelectionConfig
    from .transforms.gptq import GPTQConfig
    from .transforms.quip import quip_config_from_legacy

    unknown = sorted(set(values) - set(_BY_NAME))
    if unknown:
        raise TypeError(f"unexpected options {unknown}; see cq.options.OPTIONS for the accepted names")
    groups: dict[str, dict[str, Any]] = {k: {} for k in ("config", "selection", "recipe", "gptq", "quip", "lora",
                                                         "learned")}
    given: dict[str, dict[str, Any]] = {k: {} for k in groups}
    for name, value in values.items():
        opt = _BY_NAME[name]
        if opt.kind == "noop" and not _is_default(opt, value):
            log.info("%s=%r has no effect: %s", name, value, opt.why)
        if opt.kind in groups:
            groups[opt.kind][opt.field] = value
            if not _is_default(opt, value):
                given[opt.kind][name] = value

    from .memory import memory_policy

    fields = dict(groups["config"])
    streaming = fields.pop("streaming_mode", "balanced")
    fields["memory"] = memory_policy(streaming, low_memory=bool(fields.get("low_memory")),
                                     streaming_thresholds=fields.pop("streaming_thresholds", None))
    fields["low_memory"] = bool(fields.get("low_memory")) or streaming != "off"

    r = groups["recipe"]
    optimizer = r.get("optimizer") or "rtn"
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={optimizer!r} is not one of {list(OPTIMIZERS)}")
    if given["learned"] and optimizer not in LEARNED_ROUNDING:
        raise ConfigError(f"{sorted(given['learned'])} tune learned rounding; they need optimizer 'original', 'adamw' or "
                          f"'radam' (got optimizer={optimizer!r})")
    mode, block_size = r.get("scaling_mode"), r.get("block_size")
    shrink = r.get("hessian_shrink")
    if shrink is not None and optimizer not in ("gptq", "quip"):
        raise ConfigError(f"hessian_shrink={shrink} shapes the calibration Hessian of GPTQ/QuIP; optimizer={optimizer!r} "
                          "uses none. Drop it or choose optimizer 'gptq'/'quip'")
    upstream = r.get("upstream_strength")
    if upstream is not None and optimizer not in ("gptq", "quip"):
        raise ConfigError(f"upstream_strength={upstream} tunes GPTQ/QuIP with a sequential calibration file; "
                          f"optimizer={optimizer!r} uses none. Drop it or choose optimizer 'gptq'/'quip'")
    requant_block = optimizer == "quip" and groups["quip"].get("requant_scheme") == "block"
    if block_size is not None and mode != "block" and not requant_block:
        raise ConfigError(f"block_size={block_size} only applies to scaling_mode='block' (or QuIP's "
                          f"quip_requant_scheme='block'); the scaling mode is {mode or 'row'!r}. Drop block_size or "
                          "set scaling_mode='block'")
    if given["gptq"] and optimizer != "gptq":
        raise ConfigError(f"{sorted(given['gptq'])} only apply to optimizer='gptq' (got optimizer={optimizer!r})")
    if given["quip"] and optimizer != "quip":
        raise ConfigError(f"{sorted(given['quip'])} only apply to optimizer='quip' (got optimizer={optimizer!r})")
    if optimizer == "quip":
        if mode in ("tensor", "block"):
            raise ConfigError(f"optimizer='quip' writes per-row [N,1] scales (its ConvRot/LDLQ output); "
                              f"scaling_mode={mode!r} cannot apply. Drop scaling_mode, or use optimizer 'gptq'/'rtn'")
        q = {k: v for k, v in groups["quip"].items() if v is not None}
        recipe = QuIP(quip_config_from_legacy(block_size=int(block_size or 128), **q))
        if shrink is not None:
            recipe = QuIP(attrs.evolve(recipe.quip, hessian_shrink=_shrink_value(shrink)))
        if upstream is not None:
            recipe = QuIP(attrs.evolve(recipe.quip, upstream_strength=float(upstream)))
        if q.get("seed") is not None and recipe.quip.resolved_output == "convrot":
            raise ConfigError(f"quip_seed={q['seed']} seeds QuIP's two-sided transform, which the ComfyUI-native "
                              "ConvRot output does not use (its rotation is fixed); drop quip_seed, or pick the "
                              "requant/transformed output")
    elif optimizer in LEARNED_ROUNDING:
        from .converters.learned_rounding import learned_round_config_from_legacy

        learned = learned_round_config_from_legacy(optimizer=optimizer, **{k: v for k, v in groups["learned"].items()
                                                                          if v is not None})
        recipe = LearnedRound(granularity_for(mode, block_size), learned)
    elif optimizer == "gptq":
        g = groups["gptq"]
        if g.pop("turbo", False):
            # The turbo flag asks for a Triton GPTQ kernel; cq's GPTQ runs its column loop in torch
            # (the rounding inside it goes through the kernel registry), so say so instead of pretending.
            warnings.warn("gptq_turbo: cq has no Triton GPTQ kernel; running the torch implementation",
                          UserWarning, stacklevel=3)
        recipe = GPTQ(granularity_for(mode, block_size),
                      GPTQConfig(**{k: bool(v) for k, v in g.items() if v is not None}),
                      **({} if shrink is None else {"hessian_shrink": _shrink_value(shrink)}),
                      **({} if upstream is None else {"upstream_strength": float(upstream)}))
    else:
        recipe = RTN(granularity_for(mode, block_size))
    fields["recipe"] = recipe

    lora = groups["lora"]
    paths = ([lora["path"]] if lora.get("path") else []) + list(lora.get("paths") or [])
    if paths:
        fields.update(merge_loras=tuple(paths), merge_lora_scale=lora.get("scale", 1.0),
                      merge_lora_dampen=lora.get("dampen", True))
    elif given["lora"]:
        raise ConfigError(f"{sorted(given['lora'])} need LoRA files: pass merge_lora_path or merge_lora_paths")

    if fields.get("calibration_path") is None and optimizer in ("gptq", "quip") and fields.get("calibration_lora_path"):
        fields["synthetic_calibration"] = True
    sel = {k: v for k, v in groups["selection"].items()}
    sel.update(fp16=bool(sel.get("fp16")), fp8=bool(sel.get("fp8")), scaling_mode=mode, block_size=block_size)
    fields["selection"] = SelectionConfig.from_legacy(**sel)
    fields = {k: v for k, v in fields.items() if v is not None}  # unset: the config's own default
    return str(values["input_file"]), str(values["output_file"]), ConvertConfig(**fields)


# ---------------------------------------------------------------------------------------------
# The CLI from the same rows.


def _flags(names: Iterable[str]) -> list[str]:
    """The flags plus the dash/underscore twin of each long flag (``--block_size`` / ``--block-size``)."""
    names = list(names)
    extra = []
    for n in names:
        if n.startswith("--"):
            twin = "--" + (n[2:].replace("_", "-") if "_" in n else n[2:].replace("-", "_"))
            if twin not in names and twin not in extra:
                extra.append(twin)
    return names + extra


def add_cli_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every option with flags to ``parser``, in argument groups, with the table's help."""
    groups: dict[str, Any] = {}
    for o in OPTIONS:
        if not o.flags:
            continue
        g = groups.setdefault(o.group, parser.add_argument_group(o.group))
        kw = dict(o.cli)
        kw.setdefault("dest", o.name)
        if "default" not in kw and o.default is not REQUIRED:
            kw["default"] = o.default
        if o.help is not None:
            kw["help"] = o.help
        g.add_argument(*_flags(o.flags), **kw)
    return parser


def values_from_cli(args: argparse.Namespace, output: str) -> dict[str, Any]:
    """Option values for :func:`build_config` from parsed CLI arguments (``output`` already resolved)."""
    values = {o.name: getattr(args, o.cli.get("dest", o.name)) for o in OPTIONS if o.facade is not None and o.flags}
    values.update(input_file=args.input, output_file=output, comfy_quant=not args.legacy_format,
                  filter_flags={name: True for name in PRESETS if getattr(args, name)},
                  seed=max(args.manual_seed, 0))
    if args.layer_config:
        from .io.layer_config import load_layer_config

        values["layer_config"] = load_layer_config(args.layer_config)
    return {k: v for k, v in values.items() if not (k in CONVERTER_KWARGS and v is None)}
