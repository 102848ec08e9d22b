"""The FP8 recipe record, registered with cq's recipe registry (``cq.recipes.register_recipe``).

``FP8()`` in a layer config (or ``--fp8`` for every candidate layer) makes the layer a ComfyUI-native
``float8_e4m3fn`` layer: per-tensor float32 ``weight_scale``, e4m3 codes rounded to nearest even with
saturation, and with ``input_scale=True`` a static ``input_scale`` from the calibration absmax
(``state.meta["input_absmax"]``). Import this module once (``import cq.fp8_recipe``) to register it.

Example:
    >>> from cq.recipes import recipe_label, recipe_pipeline
    >>> recipe_pipeline(FP8()).names, recipe_label(FP8(input_scale=True))
    (('check_finite', 'fp8_scale', 'fp8_round'), 'FP8')
"""

from __future__ import annotations

import attrs

from .errors import ConfigError
from .kernels import Backend
from .pipeline import Pipeline
from .recipes import register_recipe
from .transforms.fp8 import Fp8Config, fp8_measure_stage, fp8_pipeline

__all__ = ["FP8", "fp8_measure_stage"]


def _bool(instance, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(f"FP8.{attribute.name}={value!r} must be True or False")


@attrs.frozen
class FP8:
    """Store the layer as ComfyUI's ``float8_e4m3fn`` (per-tensor scale; for Ada/Hopper FP8 matmuls)."""

    input_scale: bool = attrs.field(default=False, validator=_bool)


@register_recipe(FP8)
def _fp8(recipe: FP8, *, backend: Backend) -> Pipeline:
    return fp8_pipeline(Fp8Config(input_scale=recipe.input_scale))  # no kernel choice: plain torch casts
