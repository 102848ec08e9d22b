"""The conversion configuration: one frozen record, validated when it is built.

Which pipeline a layer gets is decided by :mod:`cq.recipes` from ``recipe`` (the INT8 recipe of the
run) and the layer's selection decision; this record only holds the choices.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import attrs
import torch

from ._validators import positive_int
from .errors import ConfigError
from .kernels import Backend
from .recipes import GPTQ, RTN, recipe_info
from .state import Granularity, PerBlock, PerRow, PerTensor

__all__ = ["ConvertConfig", "granularity_for", "resolve_device", "SCALING_MODES", "DEVICE_CHOICES"]

#: Scaling modes accepted by the CLI / facade and the scale layout each produces.
#: ``axis`` is the reference's name for per-row scales; cq writes it the way ComfyUI reads it ([N, 1]).
SCALING_MODES = ("tensor", "row", "axis", "block")
#: ``auto`` is CUDA when available, else the CPU; ``cuda:N`` picks a GPU.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


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


def _device(instance, attribute, value):
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ConfigError(f"device={value!r} is not one of {list(DEVICE_CHOICES)} (e.g. 'cuda:1')")


def resolve_device(device: str) -> torch.device:
    """The torch device a run uses: ``auto`` → CUDA when available, else the CPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}: this machine has no CUDA device (torch {torch.__version__}); "
                              "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def _paths(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        value = [value]
    return tuple(str(v) for v in value)


def _transforms(value: Any) -> tuple[Callable, ...]:
    value = tuple(value or ())
    bad = [v for v in value if not callable(v)]
    if bad:
        raise ConfigError(f"model_transforms must be callables ModelView -> ModelEdits, got {bad!r}")
    return value


@attrs.frozen(kw_only=True)
class ConvertConfig:
    """Everything :func:`cq.convert.convert_file` needs to know, validated at construction.

    ``recipe`` is the INT8 recipe of quantized layers (:class:`~cq.recipes.RTN` by default, or
    :class:`~cq.recipes.GPTQ`, :class:`~cq.recipes.QuIP`, or any registered record); layers the
    selection sends to fp16 use :class:`~cq.recipes.FP16`. ``selection`` is a
    :class:`cq.selection.SelectionConfig` (which tensors, presets, per-layer overrides).
    ``model_transforms`` run on the whole model before the per-layer pipelines (see :mod:`cq.model`);
    ``merge_loras`` adds the LoRA merge among them.

    Example:
        >>> ConvertConfig(recipe=GPTQ(), calibration_path="calib.safetensors").recipe.granularity
        PerRow()
        >>> ConvertConfig(calibration_path="calib.safetensors")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cq.errors.ConfigError: calibration data ... RTN ...
    """

    recipe: Any = attrs.field(factory=RTN)
    selection: Any = None  # cq.selection.SelectionConfig
    # output format
    comfy: bool = True  # False: the reference's legacy non-comfy layout (`.scale_weight`)
    legacy_axiswise: bool = False  # write per-row scales as [N] "int8_axiswise" (fork custom nodes only)
    full_precision_matrix_mult: bool = False
    save_quant_metadata: bool = False
    include_input_scale: bool = False
    # calibration
    calibration_path: str | None = None
    synthetic_calibration: bool = False  # the reference's Gaussian-noise Hessians (not data-aware)
    calib_samples: int = attrs.field(default=6144, validator=positive_int)
    calibration_lora_path: str | None = None
    # model-level steps
    merge_loras: tuple[str, ...] = attrs.field(default=(), converter=_paths)
    merge_lora_scale: float = attrs.field(default=1.0, converter=float)
    merge_lora_dampen: bool = True
    model_transforms: tuple[Callable, ...] = attrs.field(default=(), converter=_transforms)
    smoothquant: bool = False  # exact smoothing folds from calibration statistics (a model transform)
    smoothquant_alpha: float | None = None  # None: searched per mapping
    # inputs and model-level choices
    requantize_int8: bool = False  # re-quantize layers that are already ComfyUI int8 (default: copy them)
    auto_preset: bool = True  # apply the preset of the detected architecture when no preset was chosen
    fp8_input_scale: bool = False  # FP8 layers also get a static input_scale from the calibration absmax
    bias_correction: bool = False  # fold the expected output error (calibration means) into existing biases
    strict_hessian: bool = False  # a bad calibration Hessian stops the run (default: that layer is rounded to nearest)
    # run
    seed: int = 0
    metrics_tokens: int = attrs.field(default=64, validator=attrs.validators.ge(0))
    quality_threshold: float = 30.0
    low_memory: bool = False
    #: host-memory tier and GPU offload thresholds (cq.memory.MemoryPolicy); None: from low_memory
    memory: Any = None
    backend: Backend = attrs.field(default=Backend.AUTO, converter=Backend)
    device: str = attrs.field(default="auto", validator=_device)

    def __attrs_post_init__(self):
        info = recipe_info(self.recipe)  # an unregistered recipe fails here, before any file is read
        if self.legacy_axiswise and getattr(self.recipe, "granularity", PerRow()) != PerRow():
            raise ConfigError(f"legacy_axiswise=True writes per-row scales as [N]; it cannot be combined with "
                              f"{self.recipe!r}")
        if self.include_input_scale and self.comfy:
            raise ConfigError("include_input_scale only applies to the legacy non-comfy format; ComfyUI ignores "
                              "input_scale for int8_tensorwise, so cq does not write it (drop the option)")
        other_use = self.fp8_input_scale or self.smoothquant or self.bias_correction
        if self.calibration_path and not info.uses_hessian and not other_use:
            raise ConfigError(f"calibration data is only used by data-aware recipes (GPTQ, QuIP), SmoothQuant, bias "
                              f"correction and FP8 input scales; the recipe is {type(self.recipe).__name__} "
                              f"({self.recipe!r}) and none of those is on, so it would be ignored. Choose optimizer "
                              "'gptq' or 'quip', or drop the calibration option")
        if self.synthetic_calibration and not info.uses_hessian:
            raise ConfigError(f"synthetic calibration only shapes the Hessians of GPTQ/QuIP; the recipe is "
                              f"{type(self.recipe).__name__}, which would ignore it")
        if self.calibration_lora_path and not self.synthetic_calibration and not self.calibration_path:
            raise ConfigError("calibration_lora_path only shapes the synthetic Hessians; set synthetic_calibration "
                              "(the facade does when an optimizer is gptq/quip) or drop it")
        if self.smoothquant and not self.calibration_path:
            raise ConfigError("smoothquant needs calibration data (per-channel input absmax and Hessians of the "
                              "consumers); pass calibration_path (--calibration-data) or drop it")
        if self.smoothquant_alpha is not None and not self.smoothquant:
            raise ConfigError(f"smoothquant_alpha={self.smoothquant_alpha} needs smoothquant=True (--smoothquant)")
        if self.bias_correction and not self.calibration_path:
            raise ConfigError("bias_correction needs calibration data with input means (a cq calibration file); "
                              "without data a correction would be noise. Pass calibration_path or drop it")
        if self.fp8_input_scale and not self.calibration_path:
            raise ConfigError("fp8_input_scale needs calibration data (its input absmax); pass calibration_path "
                              "(--calibration-data) or drop the option")
        if not self.merge_loras and (self.merge_lora_scale != 1.0 or not self.merge_lora_dampen):
            raise ConfigError("merge_lora_scale / merge_lora_dampen need LoRA files to merge (merge_loras); "
                              "pass the LoRA paths or drop these options")
