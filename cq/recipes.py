"""Recipes: the one place that decides which pipeline a layer gets.

A recipe is a small frozen config record (:class:`RTN`, :class:`GPTQ`, :class:`QuIP`, :class:`FP16`,
or your own); a registry keyed by the record's *type* maps it to the handler that builds its
pipeline (the shape of torchao's ``quantize_(model, config)`` handler registry). The runner, the
facade, the CLI and the converter classes all go through :func:`recipe_pipeline`.

Register a recipe of your own without editing cq:

    >>> import attrs
    >>> from cq.pipeline import pipeline, stage
    >>> from cq.transforms import ScaleConfig, absmax_scale, check_finite, round_to_nearest
    >>> @attrs.frozen
    ... class TensorRTN:
    ...     pass
    >>> @register_recipe(TensorRTN)
    ... def _tensor_rtn(recipe, *, backend):
    ...     return pipeline(check_finite, stage(absmax_scale, ScaleConfig(PerTensor())), round_to_nearest)
    >>> recipe_pipeline(TensorRTN()).names
    ('check_finite', 'absmax_scale', 'round_to_nearest')
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import attrs
import torch

from .errors import ConfigError
from .kernels import Backend
from .pipeline import Pipeline, pipeline, stage
from .state import Granularity, LayerState, PerBlock, PerGroup, PerRow, PerTensor
from .transforms import (GPTQConfig, MetricsConfig, QuIPConfig, RoundConfig, ScaleConfig, absmax_scale, check_finite,
                         check_linear, fp16_cast, gptq_update, measure, round_to_nearest)
from .transforms.hessian_shrink import HessianShrinkConfig, shrink_hessian, shrink_validator
from .transforms.upstream import UpstreamConfig, strength_validator, upstream_correct

__all__ = ["RTN", "GPTQ", "QuIP", "LearnedRound", "FP16", "FP8", "Recipe", "RecipeInfo", "register_recipe", "recipe_pipeline",
           "recipe_info", "recipe_label", "registered_recipes", "with_granularity", "rtn_pipeline", "gptq_pipeline", "fp16_pipeline",
           "metrics_inputs", "measure_stage"]


def _granularity(instance, attribute, value):
    if not isinstance(value, (PerTensor, PerRow, PerBlock, PerGroup)):
        raise ConfigError(f"{type(instance).__name__}.granularity={value!r} must be PerRow() (ComfyUI-native "
                          "[N,1], the default), PerTensor(), PerBlock(size) or PerGroup(size)")


@attrs.frozen
class RTN:
    """Round-to-nearest with absmax scales of ``granularity`` (cq's default INT8 recipe)."""

    granularity: Granularity = attrs.field(default=PerRow(), validator=_granularity)


@attrs.frozen
class GPTQ:
    """GPTQ with the layer's calibration Hessian (round-to-nearest quality without one).

    ``hessian_shrink``: ``β`` of ``(1 − β)·H + β·diag(H)`` first (``"auto"``: ``min(0.3, 0.7·K/T)`` for
    ``T`` calibration tokens, measured better on held-out inputs; 0: GPTQ as published). ``upstream_strength``: with a sequential calibration file, the
    fraction of the step toward the float model's output (:mod:`cq.transforms.upstream`; 0.5; 0: off).
    """

    granularity: Granularity = attrs.field(default=PerRow(), validator=_granularity)
    gptq: GPTQConfig = attrs.field(factory=GPTQConfig, validator=attrs.validators.instance_of(GPTQConfig))
    hessian_shrink: float | str = attrs.field(default="auto", validator=shrink_validator)
    upstream_strength: float = attrs.field(default=0.5, validator=strength_validator)


@attrs.frozen
class QuIP:
    """Incoherence + LDLQ; ``quip.resolved_output == "convrot"`` is ComfyUI-native (per-row scales)."""

    quip: QuIPConfig = attrs.field(factory=QuIPConfig, validator=attrs.validators.instance_of(QuIPConfig))


@attrs.frozen
class LearnedRound:
    """AdaRound-style learned rounding started from LDLQ (``start``: ``"ldlq"``, ``"gptq"``, ``"rtn"``).

    Never worse than its start on its own objective; at INT8 it buys nothing over LDLQ on held-out
    data (README), so it is offered for the reference's ``optimizer=original|adamw|radam`` only.
    """

    granularity: Granularity = attrs.field(default=PerRow(), validator=_granularity)
    learned: Any = None  # cq.transforms.learned_round.LearnedRoundConfig (None: its defaults)
    start: str = attrs.field(default="ldlq", validator=attrs.validators.in_(("ldlq", "gptq", "rtn")))


@attrs.frozen
class FP16:
    """Store the layer as float16 (the reference's ``--fp16`` target)."""


@attrs.frozen
class FP8:
    """ComfyUI-native ``float8_e4m3fn`` (per-tensor float32 scale; the fast path on Ada/Hopper GPUs).

    ``input_scale``: also write a static ``input_scale`` from the calibration's input absmax.
    """

    input_scale: bool = attrs.field(default=False)

    @input_scale.validator
    def _bool(self, attribute, value):
        if not isinstance(value, bool):
            raise ConfigError(f"FP8.input_scale={value!r} must be True or False")


#: Any registered recipe record.
Recipe = Any


@attrs.frozen
class RecipeInfo:
    """A registered recipe: its pipeline builder and what it needs from the run.

    ``uses_hessian``: the runner attaches the layer's calibration (or synthetic) Hessian before the
    pipeline. ``quantized``: the layer counts as quantized in the report (fp16 does not).
    ``granularity``: the recipe record has a ``granularity`` field that per-layer overrides may set.
    ``judges_hessian``: the pipeline's solver factors the Hessian itself and falls back to
    round-to-nearest with a note when that fails (GPTQ/LDLQ), so the runner's check can skip its own
    factorization.
    """

    build: Callable[..., Pipeline]
    uses_hessian: bool = False
    quantized: bool = True
    #: ``measure(probe_state, tokens, seed, *, backend, full_precision_matrix_mult) -> Stage`` for
    #: formats whose runtime path is not ComfyUI's int8 W8A8 (``None``: :func:`measure_stage`).
    measure: Callable[..., Any] | None = None
    judges_hessian: bool = False


_REGISTRY: dict[type, RecipeInfo] = {}


def register_recipe(recipe_type: type, *, uses_hessian: bool = False, quantized: bool = True,
                    measure: Callable[..., Any] | None = None, judges_hessian: bool = False):
    """Decorator: register ``build(recipe, *, backend) -> Pipeline`` for records of ``recipe_type``.

    ``uses_hessian``: the runner attaches calibration data first; ``quantized=False``: the layer is
    not counted as quantized (fp16); ``measure``: the metrics stage builder when the format's runtime
    path is not int8 W8A8; ``judges_hessian``: see :class:`RecipeInfo`. Registering a type again replaces
    its handler.
    """
    if not isinstance(recipe_type, type):
        raise ConfigError(f"register_recipe needs a class (the recipe's config type), got {recipe_type!r}")

    def decorate(build: Callable[..., Pipeline]) -> Callable[..., Pipeline]:
        _REGISTRY[recipe_type] = RecipeInfo(build, uses_hessian=uses_hessian, quantized=quantized, measure=measure,
                                            judges_hessian=judges_hessian)
        return build

    return decorate


def registered_recipes() -> tuple[type, ...]:
    return tuple(_REGISTRY)


def recipe_info(recipe: Recipe) -> RecipeInfo:
    """The registry entry of ``recipe``'s type, or a ConfigError listing the registered types."""
    try:
        return _REGISTRY[type(recipe)]
    except KeyError:
        names = sorted(t.__name__ for t in _REGISTRY)
        raise ConfigError(f"no recipe is registered for {type(recipe).__name__} ({recipe!r}); registered: {names}. "
                          "Register one with @cq.register_recipe(YourConfigType)") from None


def recipe_pipeline(recipe: Recipe | Pipeline, *, backend: Backend | str = Backend.AUTO) -> Pipeline:
    """The pipeline of ``recipe`` (a :class:`~cq.pipeline.Pipeline` is its own recipe).

    Example:
        >>> recipe_pipeline(RTN()).names, recipe_pipeline(RTN(PerTensor())).names
        (('fused_rtn',), ('check_finite', 'absmax_scale', 'round_to_nearest'))
        >>> recipe_pipeline(QuIP()).names
        ('check_finite', 'shrink_hessian', 'upstream_correct', 'convrot', 'scale', 'scale_search', 'ldlq')
    """
    if isinstance(recipe, Pipeline):
        return recipe
    pipe = recipe_info(recipe).build(recipe, backend=Backend(backend))
    if not isinstance(pipe, Pipeline):
        raise ConfigError(f"the recipe handler for {type(recipe).__name__} returned {type(pipe).__name__}, "
                          "not a cq.Pipeline")
    return pipe


def recipe_label(recipe: Recipe | Pipeline) -> str:
    """A short human label: the recipe's type and its scale layout (``--dry-run``, progress).

    Example:
        >>> recipe_label(RTN()), recipe_label(GPTQ(PerTensor())), recipe_label(QuIP())
        ('RTN per-row', 'GPTQ per-tensor', 'QuIP convrot')
    """
    if isinstance(recipe, Pipeline):
        return "pipeline(" + ", ".join(recipe.names) + ")"
    parts = [type(recipe).__name__]
    gran = getattr(recipe, "granularity", None)
    if gran is not None:
        size = getattr(gran, "size", None)
        parts.append({"PerRow": "per-row", "PerTensor": "per-tensor"}.get(type(gran).__name__,
                                                                          f"{type(gran).__name__}({size})"))
    if isinstance(recipe, QuIP):
        parts.append(recipe.quip.resolved_output)
    return " ".join(parts)


def with_granularity(recipe: Recipe, granularity: Granularity, *, layer: str = "layer") -> Recipe:
    """``recipe`` with its scales' granularity replaced (a per-layer scaling override).

    Example:
        >>> with_granularity(RTN(), PerTensor())
        RTN(granularity=PerTensor())
    """
    if isinstance(recipe, Pipeline):
        raise ConfigError(f"{layer}: a per-layer scaling override cannot change a custom pipeline; put the scale "
                          "stage you want into the pipeline itself")
    fields = attrs.fields_dict(type(recipe)) if attrs.has(type(recipe)) else {}
    if "granularity" in fields:
        return attrs.evolve(recipe, granularity=granularity)
    if granularity == PerRow():
        return recipe
    raise ConfigError(f"{layer}: recipe {type(recipe).__name__} writes per-row scales only; it cannot use "
                      f"{granularity!r}. Drop the scaling override for this layer, or choose optimizer 'rtn'/'gptq'")


# ---------------------------------------------------------------------------------------------
# cq's recipes, all registered the same way.


def rtn_pipeline(granularity: Granularity = PerRow(), *, backend: Backend | str = Backend.AUTO) -> Pipeline:
    """check_finite → absmax_scale → round_to_nearest: cq's default INT8 recipe.

    Example:
        >>> rtn_pipeline().names
        ('check_finite', 'absmax_scale', 'round_to_nearest')
    """
    return pipeline(check_finite, stage(absmax_scale, ScaleConfig(granularity)),
                    stage(round_to_nearest, RoundConfig(backend)))


def gptq_pipeline(*, granularity: Granularity = PerRow(), gptq: GPTQConfig = GPTQConfig(),
                  metrics_x: torch.Tensor | None = None, hessian_shrink: float | str = 0.0,
                  upstream_strength: float = 0.0) -> Pipeline:
    """``check_linear → check_finite → absmax_scale → gptq_update`` (→ ``measure`` with ``metrics_x``).

    ``hessian_shrink > 0`` adds ``shrink_hessian`` before the scales and ``upstream_strength > 0`` then
    ``upstream_correct`` (the :class:`GPTQ` recipe's defaults: ``"auto"`` and 0.5).

    Attach the layer's Hessian to the state first (``LayerState.from_weight(..., hessian=H)`` or
    :func:`cq.io.calibration.attach_calibration`); without one GPTQ is round-to-nearest.

    Example:
        >>> gptq_pipeline().names
        ('check_linear', 'check_finite', 'absmax_scale', 'gptq_update')
    """
    stages = [stage(check_linear), stage(check_finite)]
    if hessian_shrink != 0:
        stages.append(stage(shrink_hessian, HessianShrinkConfig(hessian_shrink)))
    if upstream_strength > 0:
        stages.append(stage(upstream_correct, UpstreamConfig(strength=upstream_strength)))
    stages += [stage(absmax_scale, ScaleConfig(granularity)), stage(gptq_update, gptq)]
    if metrics_x is not None:
        stages.append(stage(measure, MetricsConfig(x=metrics_x)))
    return pipeline(*stages)


def fp16_pipeline() -> Pipeline:
    """check_finite → fp16_cast (the reference's ``--fp16`` target)."""
    return pipeline(check_finite, fp16_cast)


@register_recipe(RTN)
def _rtn(recipe: RTN, *, backend: Backend) -> Pipeline:
    if recipe.granularity == PerRow() and backend is not Backend.TRITON:
        # One sweep per weight: codes, scales and the weight metrics from the stored dtype (the
        # ``quantize_rows`` kernel; bit-identical to rtn_pipeline's codes and scales).
        from .transforms.fused import FusedRTNConfig, fused_rtn

        return pipeline(stage(fused_rtn, FusedRTNConfig(backend=backend)))
    return rtn_pipeline(recipe.granularity, backend=backend)


@register_recipe(GPTQ, uses_hessian=True, judges_hessian=True)
def _gptq(recipe: GPTQ, *, backend: Backend) -> Pipeline:
    return gptq_pipeline(granularity=recipe.granularity, gptq=attrs.evolve(recipe.gptq, backend=backend),
                         hessian_shrink=recipe.hessian_shrink, upstream_strength=recipe.upstream_strength)


@register_recipe(QuIP, uses_hessian=True, judges_hessian=True)
def _quip(recipe: QuIP, *, backend: Backend) -> Pipeline:
    from .transforms.quip import quip_pipeline

    return quip_pipeline(recipe.quip, backend=backend)


@register_recipe(FP16, quantized=False)
def _fp16(recipe: FP16, *, backend: Backend) -> Pipeline:
    return fp16_pipeline()


@register_recipe(LearnedRound, uses_hessian=True)
def _learned(recipe: LearnedRound, *, backend: Backend) -> Pipeline:
    from .transforms.learned_round import LearnedRoundConfig, learned_round_pipeline

    return learned_round_pipeline(recipe.granularity, recipe.learned or LearnedRoundConfig(), start=recipe.start)


def _fp8_measure(probe: LayerState, tokens: int, seed: int, *, backend: Backend, full_precision_matrix_mult: bool):
    from .transforms.fp8 import fp8_measure_stage

    return fp8_measure_stage(probe, tokens, seed, full_precision_matrix_mult=full_precision_matrix_mult)


@register_recipe(FP8, measure=_fp8_measure)
def _fp8(recipe: FP8, *, backend: Backend) -> Pipeline:
    from .transforms.fp8 import Fp8Config, fp8_pipeline

    return fp8_pipeline(Fp8Config(input_scale=recipe.input_scale))  # plain torch casts: no kernel choice


# ---------------------------------------------------------------------------------------------
# Measurement, a stage like any other.


@functools.lru_cache(maxsize=8)
def _gaussian_inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    # Standard Gaussian rows in float32 (half the cost of float64). Seeded by (seed, K): drawing
    # them per layer cost ~2-7 ms a layer here (mostly first-touch page faults of a fresh buffer).
    g = torch.Generator().manual_seed((seed * 1_000_003 + 7_919 * k) % 2**63)
    return torch.randn(tokens, k, generator=g, dtype=torch.float32)


def metrics_inputs(state: LayerState, tokens: int, seed: int) -> torch.Tensor | None:
    """Input rows for a layer's output and W8A8 metrics.

    With a Hessian ``H = 2/T·XᵀX`` the rows are Gaussian with the calibration's second moments
    (``x = z·Lᵀ``, ``L Lᵀ = H/2``), so the W8A8 error reflects the layer's real input scales and
    outlier channels; seeded per layer name. Without one they are standard Gaussian, a function of
    ``(tokens, K, seed)`` only: drawn once and shared by every layer of that width (the tensor is
    cached: do not modify it), so the report's inputs, and their int8 codes, are formed once per width.

    Example:
        >>> s = LayerState.from_weight("a", torch.randn(4, 8))
        >>> x = metrics_inputs(s, 16, 0)
        >>> x.shape, x is metrics_inputs(LayerState.from_weight("b", torch.randn(2, 8)), 16, 0)
        (torch.Size([16, 8]), True)
    """
    if tokens <= 0:
        return None
    k = state.shape[1]
    h = state.hessian
    if h is None:
        return _gaussian_inputs(tokens, k, seed)
    g = torch.Generator().manual_seed((seed * 1_000_003 + sum(map(ord, state.name))) % 2**63)
    z = torch.randn(tokens, k, generator=g, dtype=torch.float64)
    h = h.detach().cpu()
    if state.basis is not None:  # the Hessian is in the working basis; inputs are in the original one
        h = state.basis.hessian_to_original(h.to(torch.float32))
    cov = h.to(torch.float64) / 2
    cov = cov + torch.eye(k, dtype=torch.float64) * (1e-8 * float(cov.diagonal().mean().clamp(min=1e-30)))
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        return z.to(torch.float32)
    return (z @ chol.t()).to(torch.float32)


#: Rows the runner's report estimates output and W8A8 errors on, for layers of more than 4× as many
#: rows (importance-sampled; ±3 % at 4096 rows; weight metrics stay exact). See MetricsConfig.
REPORT_SAMPLE_ROWS = 512


def measure_stage(state: LayerState, tokens: int, seed: int, backend: Backend | str = Backend.AUTO):
    """A ``measure`` stage bound to this layer's metric inputs (on the state's device)."""
    x = metrics_inputs(state, tokens, seed)
    if x is not None:
        x = x.to(state.weight.device)
    return stage(measure, MetricsConfig(x=x, backend=backend, sample_rows=REPORT_SAMPLE_ROWS))
