"""The runner: decide what each tensor is → build its pipeline from a plan → run → write.

Who does what:

* :func:`plan_model` decides, once per tensor and before anything is computed, what happens to it
  (:class:`LayerPlan`: quantize with which recipe, keep, remove, or ride along with its layer as a
  bias). Selection rules come from :mod:`cq.selection`, the recipe from :mod:`cq.recipes`; a user's
  ``plan=`` function may rewrite any plan.
* Model transforms (:mod:`cq.model`: LoRA merging, smoothing folds, your own) see the whole model
  lazily and return per-tensor edit stages.
* :func:`layer_pipeline` composes a layer's stages: calibration attach → edits → recipe → measure.
* :func:`convert_file` streams the file: one tensor in memory at a time, moved to the run's device
  for its pipeline and back, written through the atomic writer (no output survives a failure).

Example (a per-layer plan of your own: keep every attention projection at per-tensor scales):

    >>> import attrs
    >>> from cq.recipes import RTN
    >>> from cq.state import PerTensor
    >>> def my_plan(p):
    ...     return p.with_recipe(RTN(PerTensor())) if p.action == "quantize" and ".attn." in p.key else p
    >>> # convert_file("model.safetensors", "out.safetensors", ConvertConfig(), plan=my_plan)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from typing import Any, Callable, Iterable, Mapping

import attrs
import torch

from .config import ConvertConfig, granularity_for, resolve_device
from .errors import ConfigError
from .model import LoaderView, ModelEdits, ModelTransform, ModelView, run_model_transforms
from .pipeline import Pipeline, pipeline, stage
from .recipes import FP8, FP16, Recipe, measure_stage, recipe_info, recipe_pipeline, with_granularity
from .report import ConversionReport, LayerReport
from .state import LayerState, PerBlock
from .transforms.attach import LayerData, attach_data

__all__ = ["convert_file", "convert_layer", "LayerPlan", "plan_model", "layer_pipeline", "HessianSource", "ProgressFn",
           "model_transforms_for"]

log = logging.getLogger("cq.convert")

#: ``progress(key, recipe, done_bytes, total_bytes)``: called before each tensor is processed
#: (``recipe`` is the recipe's name for converted layers, ``None`` for kept tensors) and once at the
#: end with ``key=None``. Bytes are the input's stored bytes, so the estimate suits layers of any size.
ProgressFn = Callable[[str | None, str | None, int, int], None]

ACTIONS = ("quantize", "keep", "remove", "with_layer")


@attrs.frozen(kw_only=True)
class LayerPlan:
    """What the runner does with one tensor.

    ``action``: ``quantize`` (run ``recipe``: a registered recipe record or a
    :class:`~cq.pipeline.Pipeline`), ``keep`` (copy, after any model-level edits), ``remove``, or
    ``with_layer`` (a bias written by its layer's pipeline, whose key is ``layer``).
    ``bias_key`` names the bias a quantized layer carries. ``reason`` is for the report.
    """

    key: str
    action: str = attrs.field(validator=attrs.validators.in_(ACTIONS))
    reason: str = ""
    recipe: Any = None
    bias_key: str | None = None
    layer: str | None = None
    full_precision_matrix_mult: bool = False

    @property
    def stem(self) -> str:
        return self.key[: -len(".weight")] if self.key.endswith(".weight") else self.key

    def with_recipe(self, recipe: Recipe | Pipeline) -> "LayerPlan":
        """This plan, quantized with ``recipe`` (validated when the run is planned).

        Example:
            >>> from cq.recipes import RTN
            >>> LayerPlan(key="a.weight", action="keep").with_recipe(RTN()).action
            'quantize'
        """
        return attrs.evolve(self, action="quantize", recipe=recipe)

    def recipe_name(self) -> str:
        r = self.recipe
        return "pipeline" if isinstance(r, Pipeline) else type(r).__name__


def _recipe_for(decision, cfg: ConvertConfig, key: str) -> Recipe:
    """The one rule: fp16 target → FP16; int8 → the run's recipe with the layer's scaling override."""
    if decision.target == "fp16":
        return FP16()
    if decision.target == "fp8":
        return FP8(input_scale=cfg.fp8_input_scale)
    recipe = cfg.recipe
    if decision.scaling_mode is not None:
        gran = granularity_for(decision.scaling_mode, decision.block_size)
        return with_granularity(recipe, gran, layer=key)
    if decision.block_size is not None and isinstance(getattr(recipe, "granularity", None), PerBlock):
        return with_granularity(recipe, granularity_for("block", decision.block_size), layer=key)
    return recipe


def plan_model(view: ModelView, cfg: ConvertConfig, *,
               plan: Callable[[LayerPlan], LayerPlan] | None = None) -> tuple[LayerPlan, ...]:
    """Every tensor's plan, in file order; ``plan`` (yours) may rewrite each one.

    Raises ConfigError for a plan that cannot run (unknown recipe, override a recipe cannot take),
    before anything is computed or written.
    """
    from .selection import SelectionConfig, decide

    selection = cfg.selection if cfg.selection is not None else SelectionConfig()
    keys = view.keys()
    plans: dict[str, LayerPlan] = {}
    for key in keys:
        d = decide(key, view.shape(key), view.dtype(key), selection)
        if d.action == "quantize":
            p = LayerPlan(key=key, action="quantize", reason=d.reason, recipe=_recipe_for(d, cfg, key),
                          full_precision_matrix_mult=bool(d.full_precision_matrix_mult or cfg.full_precision_matrix_mult))
        else:
            p = LayerPlan(key=key, action=d.action, reason=d.reason)
        if plan is not None:
            p = plan(p)
            if not isinstance(p, LayerPlan) or p.key != key:
                raise ConfigError(f"plan({key!r}) must return a LayerPlan for the same key, got {p!r}")
        plans[key] = p
    for key, p in plans.items():
        if p.action != "quantize":
            continue
        if len(view.shape(key)) != 2:
            raise ConfigError(f"{key}: only 2-D weights can be quantized, this one is {list(view.shape(key))}; "
                              "keep it (or let the selection rules decide)")
        if not isinstance(p.recipe, Pipeline):
            recipe_info(p.recipe)  # unknown recipe types fail now, not mid-file
        bias = p.stem + ".bias"
        if key.endswith(".weight") and bias in plans and plans[bias].action == "keep":
            plans[key] = attrs.evolve(p, bias_key=bias)
            plans[bias] = attrs.evolve(plans[bias], action="with_layer", layer=key,
                                       reason=f"bias of {p.stem}, written with its layer")
    return tuple(plans[k] for k in keys)


# ---------------------------------------------------------------------------------------------
# Hessians: calibration files and the reference's synthetic mode.


class HessianSource:
    """Each layer's calibration data: a calibration file, the synthetic mode, or nothing (H = I)."""

    def __init__(self, cfg: ConvertConfig, view: ModelView | None = None):
        self.cfg = cfg
        self.calibration = None
        self.lora_rows: Mapping[str, torch.Tensor] = {}
        self._gaussian: dict[int, torch.Tensor] = {}
        if cfg.calibration_path:
            from .io.calibration import load_calibration

            self.calibration = load_calibration(cfg.calibration_path)
        if cfg.calibration_lora_path and view is not None:
            from .lora_merge import lora_rows_for

            self.lora_rows = lora_rows_for(view, cfg.calibration_lora_path)
            if not self.lora_rows:
                log.warning("warning: calibration LoRA %s matches no layer of the model; synthetic Hessians are "
                            "plain Gaussian", cfg.calibration_lora_path)

    def __call__(self, plan: LayerPlan, k: int) -> LayerData | None:
        """The ``attach_data`` config for ``plan``'s layer, or ``None`` when there is nothing to attach."""
        wants_h = not isinstance(plan.recipe, Pipeline) and recipe_info(plan.recipe).uses_hessian
        if self.calibration is not None:
            from .io.calibration import layer_data

            data = layer_data(self.calibration, plan.stem, k, hessian=wants_h)
            if data.hessian is not None or not wants_h or not self.cfg.synthetic_calibration:
                return data
        if not wants_h or not self.cfg.synthetic_calibration:
            return None  # no data at all: GPTQ/LDLQ say "H = I" themselves
        from .io.calibration import synthetic_hessian

        rows = self.lora_rows.get(plan.key)
        note = "synthetic Gaussian Hessian (not data-aware)"
        if rows is not None and rows.shape[-1] == k:
            # Layer-specific: the LoRA's rows of *this* layer shape its Hessian (never shared by width).
            h = synthetic_hessian(k, samples=self.cfg.calib_samples, seed=self.cfg.seed, lora_rows=rows)
            return LayerData(h, note=note + ", shaped by its calibration-LoRA rows", source="synthetic")
        if k not in self._gaussian:
            self._gaussian[k] = synthetic_hessian(k, samples=self.cfg.calib_samples, seed=self.cfg.seed)
        return LayerData(self._gaussian[k], note=note, source="synthetic")


# ---------------------------------------------------------------------------------------------
# One layer.


def _prepare_stages(plan: LayerPlan, edits: ModelEdits, data: LayerData | None) -> tuple:
    # The calibration data first: model edits (a smoothing fold) carry the Hessian and the input
    # statistics into the edited layer's input space.
    return ((stage(attach_data, data),) if data is not None else ()) + tuple(edits.stages.get(plan.key, ()))


def _run_stages(plan: LayerPlan, cfg: ConvertConfig, data: LayerData | None, body: Pipeline,
                measure_on: LayerState | None) -> tuple:
    stages = []
    if data is not None and data.hessian is not None:  # judged before use: non-finite, zero, negative- or indefinite
        from .transforms.hessian_check import HessianCheckConfig, check_hessian

        # A recipe whose solver factors the Hessian anyway (RecipeInfo.judges_hessian: GPTQ/LDLQ) lets
        # the check skip its own factorization (~0.3 s a layer at K = 4096); strict runs keep it.
        solver_judges = (not isinstance(plan.recipe, Pipeline) and recipe_info(plan.recipe).judges_hessian
                         and not cfg.strict_hessian)
        stages.append(stage(check_hessian, HessianCheckConfig(strict=cfg.strict_hessian, definite=not solver_judges)))
    stages += body.stages
    if cfg.bias_correction and not isinstance(plan.recipe, (FP16, FP8)):
        from .transforms.bias_correction import BiasCorrectionConfig, bias_correction

        stages.append(stage(bias_correction, BiasCorrectionConfig()))
    if measure_on is not None:
        info = None if isinstance(plan.recipe, Pipeline) else recipe_info(plan.recipe)
        tokens = cfg.metrics_tokens if info is None or info.quantized else 0
        if info is not None and info.measure is not None:
            stages.append(info.measure(measure_on, tokens, cfg.seed, backend=cfg.backend,
                                       full_precision_matrix_mult=plan.full_precision_matrix_mult))
        else:
            stages.append(measure_stage(measure_on, tokens, cfg.seed, cfg.backend))
    return tuple(stages)


def layer_pipeline(plan: LayerPlan, cfg: ConvertConfig, *, edits: ModelEdits = ModelEdits(),
                   data: LayerData | None = None, measure_on: LayerState | None = None) -> Pipeline:
    """A quantized layer's stages: calibration attach → model edits → Hessian check → recipe → measure.

    ``measure_on`` is the state the metric inputs are drawn for (they depend on its Hessian); without
    it the pipeline has no measure stage.
    """
    body = recipe_pipeline(plan.recipe, backend=cfg.backend)
    return pipeline(*_prepare_stages(plan, edits, data), *_run_stages(plan, cfg, data, body, measure_on))


def convert_layer(plan: LayerPlan, view: ModelView, cfg: ConvertConfig, edits: ModelEdits, hessians: HessianSource,
               device: torch.device) -> tuple[dict[str, torch.Tensor], LayerReport, dict | None]:
    """Read, edit, run and lay out one quantized layer: ``(tensors to write, report row, .comfy_quant entry)``.

    Pure with respect to the output file (it writes nothing), so a distributed run can call it on
    any rank for any layer and get the same bytes.
    """
    from .io import layer_tensors
    from .io.comfy import decode_comfy_quant

    stem = plan.stem
    w = view.tensor(plan.key)
    bias = None
    bias_dtype = None
    if plan.bias_key is not None:
        b = view.tensor(plan.bias_key)
        bias_dtype = b.dtype
        bias = edits.apply(plan.bias_key, b)
    data = hessians(plan, w.shape[1])
    body = recipe_pipeline(plan.recipe, backend=cfg.backend)
    # A fused first stage reads the stored dtype itself (one sweep); everything else works in float32.
    direct = body.names[:1] == ("fused_rtn",) and data is None and plan.key not in edits
    state = LayerState.from_weight(stem, w if direct else w.to(torch.float32), bias=bias).to(device)
    # The metric inputs follow the Hessian the recipe will see (after any fold): draw them from there.
    probe = pipeline(*_prepare_stages(plan, edits, data))(state)
    out = pipeline(*_run_stages(plan, cfg, data, body, measure_on=probe))(probe).to("cpu")
    if out.bias is not None and bias_dtype is not None:
        out = attrs.evolve(out, bias=out.bias.to(bias_dtype))
    tensors = layer_tensors(out, comfy=cfg.comfy, legacy_axiswise=cfg.legacy_axiswise,
                            full_precision_matrix_mult=plan.full_precision_matrix_mult)
    scale_t = tensors.get(f"{stem}.weight_scale", tensors.get(f"{stem}.scale_weight"))
    if not cfg.comfy and cfg.include_input_scale and scale_t is not None:
        tensors[f"{stem}.scale_input"] = torch.ones_like(scale_t)
    label = tensors.get(f"{stem}.comfy_quant")
    entry = None if label is None else decode_comfy_quant(label, name=stem)  # what ComfyUI will read
    report = LayerReport(name=stem, action="quantize", reason=plan.reason, recipe=plan.recipe_name(),
                         format=(entry or {}).get("format", out.format), shape=tuple(w.shape),
                         scale_shape=None if scale_t is None else tuple(scale_t.shape),
                         metrics=dict(out.metrics), notes=out.notes,
                         source=view.note(plan.key) if hasattr(view, "note") else None)
    return tensors, report, entry


# ---------------------------------------------------------------------------------------------
# The model.


def open_model(loader, cfg: ConvertConfig):
    """The model as the runner sees it: stored fp8 (and, when asked, int8) layers decoded to float32.

    Returns ``(view, input plan, notes)``; see :mod:`cq.io.fp8_inputs`.
    """
    from .io.fp8_inputs import DecodedView, RequantizeWarning, plan_stored_inputs

    raw = LoaderView(loader)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RequantizeWarning)
        inputs = plan_stored_inputs(raw, requantize_int8=cfg.requantize_int8)
    for w in caught:  # said once, as a console warning line (not a Python warning with a file and line)
        if not issubclass(w.category, RequantizeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return DecodedView(raw, inputs), inputs, tuple(inputs.notes)


def resolve_selection(view: ModelView, cfg: ConvertConfig):
    """``(cfg with the presets to apply, detection, the line saying why)``: the architecture recognised
    from names and shapes picks its preset unless the user chose one or ``cfg.auto_preset`` is off."""
    from .detect import detect_architecture, resolve_presets
    from .selection import SelectionConfig

    selection = cfg.selection if cfg.selection is not None else SelectionConfig()
    detection = detect_architecture(view)
    presets, why = resolve_presets(detection, chosen=selection.presets, auto=cfg.auto_preset)
    if cfg.selection is None or presets != selection.presets:
        cfg = attrs.evolve(cfg, selection=attrs.evolve(selection, presets=presets))
    return cfg, detection, why


def model_transforms_for(cfg: ConvertConfig) -> tuple[ModelTransform, ...]:
    """The model transforms a config asks for: LoRA merging, SmoothQuant, then the user's, in order."""
    out: list[ModelTransform] = []
    if cfg.merge_loras:
        from .lora_merge import LoraMergeConfig, merge_loras

        out.append(functools.partial(merge_loras, cfg=LoraMergeConfig(paths=cfg.merge_loras, scale=cfg.merge_lora_scale,
                                                                      dampen=cfg.merge_lora_dampen)))
    if cfg.smoothquant:
        from .io.calibration import load_calibration
        from .recipes import QuIP
        from .transforms.smoothquant import SmoothQuantConfig, smoothquant

        convrot = isinstance(cfg.recipe, QuIP) and cfg.recipe.quip.resolved_output == "convrot"
        out.append(functools.partial(smoothquant, cfg=SmoothQuantConfig(
            calibration=load_calibration(cfg.calibration_path), alpha=cfg.smoothquant_alpha,
            convrot_groupsize="auto" if convrot else None)))
    out.extend(cfg.model_transforms)
    return tuple(out)


class _NoteLog:
    """Per-layer notes on the console: each distinct note once with its first layer, then a count."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def layer(self, name: str, notes: Iterable[str]) -> None:
        for n in dict.fromkeys(notes):
            self.counts[n] = self.counts.get(n, 0) + 1
            if self.counts[n] == 1:
                log.warning("warning: %s: %s", name, n)

    def repeated(self) -> list[str]:
        return [f"{n} ({c} layers)" for n, c in self.counts.items() if c > 1]


def _hoist_repeated_notes(reports: list[LayerReport]) -> list[LayerReport]:
    """A note shared by several layers is said once, in the run's notes, not in every row."""
    counts: dict[str, int] = {}
    for r in reports:
        for n in set(r.notes):
            counts[n] = counts.get(n, 0) + 1
    repeated = {n for n, c in counts.items() if c > 1}
    if not repeated:
        return reports
    return [attrs.evolve(r, notes=tuple(n for n in r.notes if n not in repeated)) for r in reports]


def _kept_tensors(p: LayerPlan, view, edits: ModelEdits) -> tuple[dict[str, torch.Tensor], dict | None, str | None]:
    """A kept tensor as written: unchanged, edited (in its own dtype), or a decoded fp8 layer's own codes."""
    stored = view.stored(p.key)
    if stored is not None and p.key not in edits:
        # a decoded fp8 layer that stays: its own codes in ComfyUI's layout, no new rounding
        from .io.fp8_inputs import passthrough_tensors

        return passthrough_tensors(view.base, stored), {**dict(stored.conf), "format": stored.format}, None
    t = view.tensor(p.key)
    if p.key not in edits:
        return {p.key: t}, None, None
    if stored is None:
        return {p.key: edits.apply(p.key, t).to(t.dtype)}, None, None
    return ({p.key: edits.apply(p.key, t).to(torch.bfloat16)}, None,
            "kept layer decoded from fp8 and edited by a model transform: written as bfloat16")


def convert_file(input_file: str, output_file: str, cfg: ConvertConfig = ConvertConfig(), *,
                 plan: Callable[[LayerPlan], LayerPlan] | None = None,
                 model_transforms: Iterable[ModelTransform] = (),
                 progress: ProgressFn | None = None, layer_source: Callable | None = None) -> ConversionReport:
    """Convert ``input_file`` to ``output_file`` following ``cfg``; returns the per-layer report.

    ``layer_source`` replaces :func:`convert_layer` (same signature and result): a distributed run
    reads the layers its ranks converted (:mod:`cq.distributed`).

    ``plan`` rewrites per-tensor plans (see :class:`LayerPlan` and the module example);
    ``model_transforms`` run after the config's own (LoRA merge). Tensors are read one at a time
    (with ``cfg.low_memory`` straight from disk) and written through a streaming, atomic writer: a
    failure at any layer leaves no output file and the input untouched.
    """
    from .io import NonNativeFormatWarning, SafetensorsWriter, UnifiedSafetensorsLoader, quantization_metadata
    from .io.comfy import NATIVE_FORMATS
    from .io.paths import check_outputs
    from .io.prefetch import BackgroundWriter

    # Before anything is read: the output must not replace a file the run reads (any spelling or link).
    check_outputs({"input": input_file, "calibration": cfg.calibration_path, "calibration LoRA": cfg.calibration_lora_path,
                   "LoRA": list(cfg.merge_loras)}, {"output": output_file})
    from .memory import layer_device, plan_budget, policy_for_config, warn_unused_thresholds

    start = time.perf_counter()
    device = resolve_device(cfg.device)
    policy = policy_for_config(cfg)
    warn_unused_thresholds(policy, device)
    source = layer_source or convert_layer
    reports: list[LayerReport] = []
    entries: dict[str, dict] = {}
    kept = removed = 0
    notes_log = _NoteLog()
    with contextlib.ExitStack() as stack:
        loader = stack.enter_context(UnifiedSafetensorsLoader(input_file, low_memory=True))
        view, inputs, input_notes = open_model(loader, cfg)
        cfg, detection, why = resolve_selection(view, cfg)
        log.log(15, "%s; %s", detection.describe().splitlines()[0], why)  # VERBOSE; the CLI prints it after the table
        plans = plan_model(view, cfg, plan=plan)
        # The memory budget from the plan, before any weight is read (a run that cannot fit stops here).
        policy = plan_budget(plans, loader.header, policy, metrics_tokens=cfg.metrics_tokens).policy
        edits = run_model_transforms(view, model_transforms_for(cfg) + tuple(model_transforms))
        for w in input_notes + edits.warnings:
            log.warning("warning: %s", w)
        hessians = HessianSource(cfg, view)
        total = sum(loader.header.tensors[p.key].nbytes for p in plans if p.action != "remove")
        # Read the next tensors while this one is quantized, bounded by the memory tier (tier "off" may
        # hold the whole input: its read-ahead is the file); the decoding of stored layers stays on top.
        read_ahead = total if policy.preload else policy.read_ahead_bytes
        if read_ahead > 0:
            from .io.fp8_inputs import DecodedView
            from .io.prefetch import PrefetchView

            order = [k for p in plans if p.action in ("quantize", "keep") for k in (p.key, p.bias_key) if k]
            view = DecodedView(stack.enter_context(PrefetchView(view.base, input_file, order, zero_copy=False,
                                                               max_bytes=read_ahead)), inputs)
        done = 0
        metadata = dict(loader.metadata() or {})
        metadata.pop("_quantization_metadata", None)  # regenerated below from this run's layers
        with SafetensorsWriter(output_file, metadata=metadata, forbid=[input_file]) as file_writer, \
                BackgroundWriter(file_writer) as writer, warnings.catch_warnings():
            # The writer warns about layouts vanilla ComfyUI cannot load; here they were asked for
            # explicitly through the config, and the report notes them once instead of per layer.
            warnings.simplefilter("ignore", NonNativeFormatWarning)
            for p in plans:
                if p.action in ("remove", "with_layer"):
                    if p.action == "remove":
                        removed += 1
                        reports.append(LayerReport(name=p.key, action="remove", reason=p.reason,
                                                   shape=tuple(view.shape(p.key))))
                    continue
                nbytes = loader.header.tensors[p.key].nbytes
                if p.bias_key is not None:
                    nbytes += loader.header.tensors[p.bias_key].nbytes
                if progress is not None:
                    progress(p.key, p.recipe_name() if p.action == "quantize" else None, done, total)
                if p.action == "keep":
                    tensors, entry, note = _kept_tensors(p, view, edits)
                    for name, t in tensors.items():
                        writer.add(name, t)
                    if entry is not None:
                        entries[p.stem] = entry
                    if note:
                        notes_log.layer(p.stem, [note])
                    kept += 1
                    reports.append(LayerReport(name=p.key, action="keep", reason=p.reason, shape=tuple(view.shape(p.key)),
                                               source=view.note(p.key)))
                else:
                    t0 = time.perf_counter()
                    dev = layer_device(p, loader.header.tensors[p.key].shape, device, policy)
                    tensors, report, entry = source(p, view, cfg, edits, hessians, dev)
                    for name, t in tensors.items():
                        writer.add(name, t)
                    if entry is not None:  # the header repeats exactly what the tensor says
                        entries[p.stem] = entry
                    notes_log.layer(p.stem, report.notes)
                    reports.append(attrs.evolve(report, seconds=time.perf_counter() - t0))
                    log.debug("%s: %s", p.stem, report.metrics)
                loader.mark_processed(p.key)
                done += nbytes
            if progress is not None:
                progress(None, None, done, total)
            for layer in inputs.keep.values():  # int8 layers copied from the input keep their header entry
                entries.setdefault(layer.stem, {**dict(layer.conf), "format": layer.format})
            if cfg.save_quant_metadata and entries:
                writer.flush()
                file_writer.update_metadata({"_quantization_metadata": quantization_metadata(entries)})
    notes = list(input_notes) + list(edits.warnings)
    odd = sorted({r.format for r in reports if r.action == "quantize" and r.format not in NATIVE_FORMATS
                  and r.format != "fp16"})
    if odd:
        notes.append(f"formats {odd} need a custom node: vanilla ComfyUI cannot load them")
    if not cfg.comfy:
        notes.append("legacy non-comfy layout (.scale_weight): vanilla ComfyUI loads these weights unquantized")
    for note in notes[len(input_notes) + len(edits.warnings):]:  # once per run, not once per layer
        warnings.warn(note, NonNativeFormatWarning, stacklevel=2)
    notes = notes_log.repeated() + notes
    return ConversionReport(input_file=str(input_file), output_file=str(output_file),
                            layers=tuple(_hoist_repeated_notes(reports)), kept=kept, removed=removed,
                            seconds=time.perf_counter() - start, quality_threshold=cfg.quality_threshold,
                            notes=tuple(notes), device=str(device),
                            model={**dict(edits.report), "detection": {"family": detection.family,
                                                                       "presets": list(cfg.selection.presets),
                                                                       "why": why, "evidence": list(detection.evidence)},
                                   "stored_inputs": {"from_fp8": list(inputs.from_fp8),
                                                     "kept_int8": [l.stem for l in inputs.keep.values()]}})
