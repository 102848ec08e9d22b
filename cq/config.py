"""The conversion configuration: one frozen record, built from cq's own options or the legacy kwargs."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from ._validators import one_of, positive_int
from .errors import ConfigError
from .kernels import Backend
from .state import Granularity, PerBlock, PerRow, PerTensor

__all__ = ["ConvertConfig", "granularity_for", "SCALING_MODES", "OPTIMIZERS"]

#: Scaling modes accepted by the CLI / facade and the scale layout each produces.
#: ``axis`` is the reference's name for per-row scales; cq writes it the way ComfyUI reads it ([N, 1]).
SCALING_MODES = ("tensor", "row", "axis", "block")
#: ``rtn`` is round-to-nearest; ``gptq``/``quip`` are data-aware; the reference's learned-rounding
#: optimizers (``original``, ``adamw``, ``radam``) are accepted names that raise NotImplementedError.
OPTIMIZERS = ("rtn", "gptq", "quip", "original", "adamw", "radam")
LEARNED_ROUNDING = ("original", "adamw", "radam")


def granularity_for(scaling_mode: str | None, block_size: int | None) -> Granularity:
    """Map a scaling mode name onto a granularity; ``None`` means cq's default, per-row.

    Example:
        >>> granularity_for("block", 64), granularity_for(None, None)
        (PerBlock(size=64), PerRow())
    """
    if scaling_mode in (None, "row", "axis"):
        return PerRow()
    if scaling_mode == "tensor":
        return PerTensor()
    if scaling_mode == "block":
        return PerBlock(int(block_size or 128))
    raise ConfigError(f"scaling_mode={scaling_mode!r} is not one of {list(SCALING_MODES)}; "
                      "use 'row' (the ComfyUI-native default) unless you need another layout")


@attrs.frozen(kw_only=True)
class ConvertConfig:
    """Everything :func:`cq.convert.convert_file` needs to know, validated at construction.

    ``selection`` is a :class:`cq.selection.SelectionConfig` (which tensors, presets, overrides);
    ``gptq`` / ``quip`` hold the optimizer configs when that optimizer is chosen.
    """

    comfy: bool = True  # False: the reference's legacy non-comfy layout (`.scale_weight`)
    target: Literal["int8", "fp16"] = attrs.field(default="int8", validator=one_of(("int8", "fp16")))
    scaling_mode: str | None = attrs.field(default=None, validator=one_of(SCALING_MODES, optional=True))
    block_size: int = attrs.field(default=128, validator=positive_int)
    legacy_axiswise: bool = False  # write per-row scales as [N] "int8_axiswise" (fork custom nodes only)
    optimizer: str = attrs.field(default="rtn", validator=one_of(OPTIMIZERS))
    selection: Any = None  # cq.selection.SelectionConfig
    full_precision_matrix_mult: bool = False
    save_quant_metadata: bool = False
    include_input_scale: bool = False
    low_memory: bool = False
    quality_threshold: float = 30.0
    calibration_path: str | None = None
    synthetic_calibration: bool = False  # the reference's Gaussian-noise Hessians (not data-aware)
    calib_samples: int = attrs.field(default=6144, validator=positive_int)
    calibration_lora_path: str | None = None
    seed: int = 0
    gptq: Any = None  # cq.transforms.gptq.GPTQConfig
    quip: Any = None  # cq.transforms.quip.QuIPConfig
    metrics_tokens: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    backend: Backend = attrs.field(default=Backend.AUTO, converter=Backend)

    def __attrs_post_init__(self):
        if self.legacy_axiswise and self.scaling_mode not in (None, "row", "axis"):
            raise ConfigError(f"legacy_axiswise=True writes per-row scales as [N]; it cannot be combined with "
                              f"scaling_mode={self.scaling_mode!r}")
        if self.include_input_scale and self.comfy:
            raise ConfigError("include_input_scale only applies to the legacy non-comfy format; ComfyUI ignores "
                              "input_scale for int8_tensorwise, so cq does not write it (drop the option)")

    @property
    def granularity(self) -> Granularity:
        return granularity_for(self.scaling_mode, self.block_size)
