"""``convert_to_int8``: the reference tool's function, as a thin facade over a config and a pipeline.

Every parameter of the reference is mapped by the one table :data:`LEGACY_PARAMETERS`: onto a
:class:`~cq.config.ConvertConfig` field, onto the layer selection, or onto a clear
``NotImplementedError`` naming the capability when it is set to a non-default value. Nothing is
silently ignored.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, List, Optional

import attrs

from .config import ConvertConfig, LEARNED_ROUNDING
from .errors import ConfigError
from .report import ConversionReport

__all__ = ["convert_to_int8", "config_from_legacy_kwargs", "LEGACY_PARAMETERS", "CONVERTER_KWARGS"]

log = logging.getLogger("cq.api")


@attrs.frozen
class Param:
    """How one legacy parameter maps onto cq.

    ``kind``: ``config`` (a ConvertConfig field named ``target``), ``selection`` (a SelectionConfig
    argument named ``target``), ``later`` (``target`` names the capability; a non-default value raises
    NotImplementedError), ``noop`` (accepted; ``target`` says why it has no effect in cq) or
    ``special`` (handled in :func:`config_from_legacy_kwargs`).
    """

    default: Any
    kind: str
    target: str | None = None


_REQUIRED = object()
_LORA_MERGE = ("merging LoRAs during a file conversion (merge in Python with cq.merge_lora_into_weight or the "
               "cq.transforms.merge_lora stage)")

#: The reference's 50 named parameters, in its order, and where each one goes.
LEGACY_PARAMETERS: dict[str, Param] = {
    "input_file": Param(_REQUIRED, "special"),
    "output_file": Param(_REQUIRED, "special"),
    "comfy_quant": Param(_REQUIRED, "config", "comfy"),
    "filter_flags": Param(_REQUIRED, "selection", "filter_flags"),
    "calib_samples": Param(_REQUIRED, "config", "calib_samples"),
    "seed": Param(_REQUIRED, "config", "seed"),
    "fp16": Param(False, "special"),
    "fallback": Param(None, "selection", "fallback"),
    "custom_layers": Param(None, "selection", "custom_layers"),
    "exclude_layers": Param(None, "selection", "exclude_layers"),
    "custom_type": Param(None, "selection", "custom_type"),
    "custom_block_size": Param(None, "selection", "custom_block_size"),
    "custom_scaling_mode": Param(None, "selection", "custom_scaling_mode"),
    "custom_simple": Param(False, "selection", "custom_simple"),
    "custom_heur": Param(False, "selection", "custom_heur"),
    "fallback_block_size": Param(None, "selection", "fallback_block_size"),
    "fallback_simple": Param(False, "selection", "fallback_simple"),
    "full_precision_matrix_mult": Param(False, "config", "full_precision_matrix_mult"),
    "skip_inefficient_layers": Param(False, "selection", "skip_inefficient_layers"),
    "include_input_scale": Param(False, "config", "include_input_scale"),
    "no_learned_rounding": Param(False, "noop", "cq's default is round-to-nearest; learned rounding runs only when "
                                                "an optimizer asks for it"),
    "save_quant_metadata": Param(False, "config", "save_quant_metadata"),
    "layer_config": Param(None, "selection", "layer_config"),
    "layer_config_fullmatch": Param(False, "selection", "layer_config_fullmatch"),
    "low_memory": Param(False, "config", "low_memory"),
    "streaming_mode": Param("balanced", "special"),
    "streaming_thresholds": Param(None, "later", "per-step GPU offload thresholds (streaming_thresholds)"),
    "no_memory_limits": Param(False, "noop", "cq has no memory guard to disable: it processes one layer at a time"),
    "report_quality": Param(False, "noop", "cq always returns the quality report; print it with report.table()"),
    "quality_threshold": Param(30.0, "config", "quality_threshold"),
    "smoothquant": Param(False, "later", "SmoothQuant"),
    "smoothquant_alpha": Param(0.5, "later", "SmoothQuant (smoothquant_alpha)"),
    "calibration_data_path": Param(None, "config", "calibration_path"),
    "calibration_lora_path": Param(None, "config", "calibration_lora_path"),
    "gptq_actorder": Param(False, "special"),
    "gptq_fast": Param(True, "special"),
    "gptq_turbo": Param(False, "special"),
    "quip_actorder": Param(True, "special"),
    "quip_hadamard": Param(True, "special"),
    "quip_seed": Param(None, "special"),
    "quip_store_transformed": Param(False, "special"),
    "quip_requant_scheme": Param("tensor", "special"),
    "quip_requant_tensor_per_row": Param(True, "special"),
    "quip_checkpointed": Param(False, "special"),
    "quip_checkpoint_threshold": Param(8192, "special"),
    "quip_checkpoint_segments": Param(4, "special"),
    "merge_lora_path": Param(None, "later", _LORA_MERGE),
    "merge_lora_paths": Param(None, "later", _LORA_MERGE),
    "merge_lora_scale": Param(1.0, "later", _LORA_MERGE),
    "merge_lora_dampen": Param(True, "later", _LORA_MERGE),
}

#: ``**converter_kwargs`` the reference's CLI passes; learned-rounding knobs name that capability.
CONVERTER_KWARGS: dict[str, Param] = {
    "optimizer": Param(None, "special"),
    "scaling_mode": Param(None, "config", "scaling_mode"),
    "block_size": Param(None, "special"),
    "legacy_axiswise": Param(False, "config", "legacy_axiswise"),
    "metrics_tokens": Param(64, "config", "metrics_tokens"),
    "backend": Param("auto", "config", "backend"),
    **{name: Param(None, "later", f"learned rounding ({name})") for name in (
        "num_iter", "lr", "lr_schedule", "top_p", "min_k", "max_k", "full_matrix", "lr_gamma", "lr_patience",
        "lr_factor", "lr_min", "lr_cooldown", "lr_threshold", "lr_adaptive_mode", "lr_shape_influence",
        "lr_threshold_mode", "early_stop_loss", "early_stop_lr", "early_stop_stall")},
}

_STREAMING_MODES = ("off", "minimal", "balanced", "aggressive", "auto")


def _later(name: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"{name}: {what} is not implemented in cq yet; leave {name} at its default")


def config_from_legacy_kwargs(**kw: Any) -> tuple[str, str, ConvertConfig]:
    """Map the reference's keyword arguments onto ``(input_file, output_file, ConvertConfig)``.

    Example:
        >>> _, _, cfg = config_from_legacy_kwargs(input_file="a.safetensors", output_file="b.safetensors",
        ...     comfy_quant=True, filter_flags={}, calib_samples=6144, seed=42)
        >>> cfg.optimizer, cfg.granularity
        ('rtn', PerRow())
    """
    from .selection import SelectionConfig

    table = {**LEGACY_PARAMETERS, **CONVERTER_KWARGS}
    unknown = sorted(set(kw) - set(table))
    if unknown:
        raise TypeError(f"convert_to_int8() got unexpected keyword arguments {unknown}; "
                        f"see cq.api.LEGACY_PARAMETERS and CONVERTER_KWARGS for the accepted names")
    missing = [n for n, p in LEGACY_PARAMETERS.items() if p.default is _REQUIRED and n not in kw]
    if missing:
        raise TypeError(f"convert_to_int8() missing required arguments {missing}")
    fields: dict[str, Any] = {}
    sel: dict[str, Any] = {}
    for name, p in table.items():
        value = kw.get(name, p.default)
        given = name in kw and value != p.default
        if p.kind == "config" and name in kw:
            fields[p.target] = value
        elif p.kind == "selection" and name in kw:
            sel[p.target] = value
        elif p.kind == "later" and given and value is not None:
            raise _later(name, p.target)
        elif p.kind == "noop" and given:
            log.info("%s=%r has no effect: %s", name, value, p.target)

    if kw.get("fp16"):
        fields["target"] = "fp16"
    mode = kw.get("streaming_mode", "balanced")
    if mode not in _STREAMING_MODES:
        raise ConfigError(f"streaming_mode={mode!r} is not one of {list(_STREAMING_MODES)}")
    # Any streaming mode reads tensors lazily from disk, like the reference's streaming loader.
    fields["low_memory"] = bool(fields.get("low_memory")) or mode != "off"
    if kw.get("block_size") is not None:
        fields["block_size"] = int(kw["block_size"])

    optimizer = kw.get("optimizer") or "rtn"
    if optimizer in LEARNED_ROUNDING:
        raise _later("optimizer", f"learned rounding (optimizer={optimizer!r})")
    fields["optimizer"] = optimizer
    fields.update(_optimizer_configs(optimizer, kw, fields.get("block_size", 128)))
    if fields.get("calibration_path") is None and optimizer in ("gptq", "quip") and kw.get("calibration_lora_path"):
        fields["synthetic_calibration"] = True
    sel.update(fp16=bool(kw.get("fp16")), scaling_mode=fields.get("scaling_mode"),
               block_size=fields.get("block_size"))
    fields["selection"] = SelectionConfig.from_legacy(**sel)
    return str(kw["input_file"]), str(kw["output_file"]), ConvertConfig(**fields)


def _optimizer_configs(optimizer: str, kw: dict, block_size: int) -> dict:
    """GPTQ / QuIP configs from the ``gptq_*`` / ``quip_*`` arguments; refuse them for other optimizers."""
    gptq_keys = [k for k in ("gptq_actorder", "gptq_fast", "gptq_turbo")
                 if k in kw and kw[k] != LEGACY_PARAMETERS[k].default]
    quip_keys = [k for k in LEGACY_PARAMETERS if k.startswith("quip_") and k in kw
                 and kw[k] != LEGACY_PARAMETERS[k].default]
    if gptq_keys and optimizer != "gptq":
        raise ConfigError(f"{gptq_keys} only apply to optimizer='gptq' (got optimizer={optimizer!r})")
    if quip_keys and optimizer != "quip":
        raise ConfigError(f"{quip_keys} only apply to optimizer='quip' (got optimizer={optimizer!r})")
    out: dict[str, Any] = {}
    if optimizer == "gptq":
        from .kernels import Backend
        from .transforms.gptq import GPTQConfig

        if kw.get("gptq_turbo"):
            # The turbo flag asks for a Triton GPTQ kernel; cq's GPTQ runs its column loop in torch
            # (the rounding inside it goes through the kernel registry), so say so instead of pretending.
            warnings.warn("gptq_turbo: cq has no Triton GPTQ kernel; running the torch reference implementation",
                          UserWarning, stacklevel=3)
        out["gptq"] = GPTQConfig(block_size=block_size, actorder=bool(kw.get("gptq_actorder", False)),
                                 lazy_batch=bool(kw.get("gptq_fast", True)),
                                 backend=Backend(kw.get("backend", "auto")))
    elif optimizer == "quip":
        from .transforms.quip import quip_config_from_legacy

        out["quip"] = quip_config_from_legacy(
            block_size=block_size, **{k[len("quip_"):]: kw[k] for k in LEGACY_PARAMETERS
                                      if k.startswith("quip_") and k in kw})
    return out


def convert_to_int8(
    input_file: str,
    output_file: str,
    comfy_quant: bool,
    filter_flags: Dict[str, bool],
    calib_samples: int,
    seed: int,
    fp16: bool = False,
    fallback: Optional[str] = None,
    custom_layers: Optional[str] = None,
    exclude_layers: Optional[str] = None,
    custom_type: Optional[str] = None,
    custom_block_size: Optional[int] = None,
    custom_scaling_mode: Optional[str] = None,
    custom_simple: bool = False,
    custom_heur: bool = False,
    fallback_block_size: Optional[int] = None,
    fallback_simple: bool = False,
    full_precision_matrix_mult: bool = False,
    skip_inefficient_layers: bool = False,
    include_input_scale: bool = False,
    no_learned_rounding: bool = False,
    save_quant_metadata: bool = False,
    layer_config: Optional[Dict[str, Any]] = None,
    layer_config_fullmatch: bool = False,
    low_memory: bool = False,
    streaming_mode: str = "balanced",
    streaming_thresholds: Optional[Dict[str, Optional[int]]] = None,
    no_memory_limits: bool = False,
    report_quality: bool = False,
    quality_threshold: float = 30.0,
    smoothquant: bool = False,
    smoothquant_alpha: float = 0.5,
    calibration_data_path: Optional[str] = None,
    calibration_lora_path: Optional[str] = None,
    gptq_actorder: bool = False,
    gptq_fast: bool = True,
    gptq_turbo: bool = False,
    quip_actorder: bool = True,
    quip_hadamard: bool = True,
    quip_seed: Optional[int] = None,
    quip_store_transformed: bool = False,
    quip_requant_scheme: str = "tensor",
    quip_requant_tensor_per_row: bool = True,
    quip_checkpointed: bool = False,
    quip_checkpoint_threshold: int = 8192,
    quip_checkpoint_segments: int = 4,
    merge_lora_path: Optional[str] = None,
    merge_lora_paths: Optional[List[str]] = None,
    merge_lora_scale: float = 1.0,
    merge_lora_dampen: bool = True,
    **converter_kwargs: Any,
) -> ConversionReport:
    """Convert a safetensors file to INT8 (the reference's signature); returns a :class:`ConversionReport`.

    With no optimizer or scaling option the output is ComfyUI-native ``int8_tensorwise`` with
    per-row ``[N, 1]`` float32 scales and round-to-nearest codes.

    Example:
        >>> report = convert_to_int8("model.safetensors", "model_int8.safetensors", comfy_quant=True,
        ...                          filter_flags={}, calib_samples=6144, seed=42)  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    kw = {k: v for k, v in locals().items() if k != "converter_kwargs"}
    passed = {k: v for k, v in kw.items()
              if LEGACY_PARAMETERS[k].default is _REQUIRED or v is not LEGACY_PARAMETERS[k].default}
    inp, out, cfg = config_from_legacy_kwargs(**passed, **converter_kwargs)
    from .convert import convert_file

    return convert_file(inp, out, cfg)
