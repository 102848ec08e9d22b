"""The model-level runner: stream a safetensors file layer by layer through per-layer pipelines."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Callable

import attrs
import torch

from .config import ConvertConfig, granularity_for
from .errors import ConfigError
from .pipeline import Pipeline
from .recipes import fp16_pipeline, measure_stage, optimizer_pipeline
from .report import ConversionReport, LayerReport
from .state import LayerState

__all__ = ["convert_file", "HessianSource"]

log = logging.getLogger("cq.convert")

#: ``on_layer(stem, index, total)`` is called before each quantized layer (CLI progress bars).
ProgressFn = Callable[[str, int, int], None]


class HessianSource:
    """Where each layer's Hessian comes from: a calibration file, the synthetic mode, or nowhere (H = I)."""

    def __init__(self, cfg: ConvertConfig):
        self.cfg = cfg
        self.calibration = None
        self.lora_rows = {}
        self._synthetic_cache: dict[int, torch.Tensor] = {}
        if cfg.calibration_path:
            from .calibration_file import load_calibration

            self.calibration = load_calibration(cfg.calibration_path)
        if cfg.calibration_lora_path:
            from .lora import load_lora_tensors

            self.lora_rows = load_lora_tensors(cfg.calibration_lora_path)

    @property
    def wanted(self) -> bool:
        has_source = self.calibration is not None or self.cfg.synthetic_calibration
        return self.cfg.optimizer in ("gptq", "quip") and has_source

    def __call__(self, stem: str, k: int) -> tuple[torch.Tensor | None, str | None]:
        """(Hessian or None, note for the report)."""
        if not self.wanted:
            return None, None
        if self.calibration is not None:
            h = self.calibration.hessian(stem)
            if h is not None:
                if tuple(h.shape) != (k, k):
                    raise ConfigError(f"{stem}: calibration Hessian has shape {tuple(h.shape)}, the weight needs "
                                      f"[{k}, {k}]; the calibration file belongs to another model")
                return h, None
            if not self.cfg.synthetic_calibration:
                return None, "no calibration entry for this layer: H = I (round-to-nearest quality)"
        from .calibration_file import synthetic_hessian

        if k not in self._synthetic_cache:
            rows = next((a for name, a in self.lora_rows.items() if name.endswith(stem) or stem.endswith(name)
                         if a.shape[-1] == k), None)
            self._synthetic_cache[k] = synthetic_hessian(k, samples=self.cfg.calib_samples, seed=self.cfg.seed,
                                                         lora_rows=rows)
        return self._synthetic_cache[k], "synthetic Gaussian Hessian (not data-aware)"


def _hoist_repeated_notes(reports: list[LayerReport]) -> tuple[list[LayerReport], list[str]]:
    """Say a note shared by several layers (e.g. "no calibration: H = I") once, in the run's notes."""
    counts: dict[str, int] = {}
    for r in reports:
        for n in set(r.notes):
            counts[n] = counts.get(n, 0) + 1
    repeated = [n for n, c in counts.items() if c > 1]
    if not repeated:
        return reports, []
    shared = [f"{n} ({counts[n]} layers)" for n in repeated]
    return [attrs.evolve(r, notes=tuple(n for n in r.notes if n not in repeated)) for r in reports], shared


def _layer_pipeline(cfg: ConvertConfig, decision, cache: dict) -> Pipeline:
    target = decision.target or cfg.target
    if target == "fp16":
        key = ("fp16",)
    else:
        # `simple` (the reference's --simple) only switches off learned rounding, which cq never runs
        # unasked; like the reference it leaves GPTQ and QuIP on.
        mode = decision.scaling_mode or cfg.scaling_mode
        bs = decision.block_size or cfg.block_size
        key = ("int8", mode, bs, cfg.optimizer)
    if key not in cache:
        if key[0] == "fp16":
            cache[key] = fp16_pipeline()
        else:
            _, mode, bs, opt = key
            cache[key] = optimizer_pipeline(opt, granularity_for(mode, bs), gptq=cfg.gptq, quip=cfg.quip,
                                            backend=cfg.backend)
    return cache[key]


def _convert_layer(stem: str, w: torch.Tensor, d, cfg: ConvertConfig, hessians: HessianSource,
                   pipes: dict) -> tuple[dict[str, torch.Tensor], LayerReport, dict | None]:
    """Run one layer's pipeline; return the tensors to write, its report row and its quant entry."""
    from .io import layer_tensors
    from .io.comfy import decode_comfy_quant

    h, h_note = hessians(stem, w.shape[1])
    state = LayerState.from_weight(stem, w.to(torch.float32), hessian=h,
                                   notes=(h_note,) if h_note else ())
    int8 = (d.target or cfg.target) == "int8"
    pipe = _layer_pipeline(cfg, d, pipes).then(
        measure_stage(state, cfg.metrics_tokens if int8 else 0, cfg.seed, cfg.backend))
    out = pipe(state)
    fpmm = bool(d.full_precision_matrix_mult or cfg.full_precision_matrix_mult)
    tensors = layer_tensors(out, comfy=cfg.comfy, legacy_axiswise=cfg.legacy_axiswise,
                            full_precision_matrix_mult=fpmm)
    scale_t = tensors.get(f"{stem}.weight_scale", tensors.get(f"{stem}.scale_weight"))
    if not cfg.comfy and cfg.include_input_scale and scale_t is not None:
        tensors[f"{stem}.scale_input"] = torch.ones_like(scale_t)
    label = tensors.get(f"{stem}.comfy_quant")
    entry = None if label is None else decode_comfy_quant(label, name=stem)  # what ComfyUI will read
    report = LayerReport(name=stem, action="quantize", reason=d.reason,
                         format=(entry or {}).get("format", out.format), shape=tuple(w.shape), scale_shape=None if scale_t is None else tuple(scale_t.shape),
                         metrics=dict(out.metrics), notes=out.notes)
    return tensors, report, entry


def convert_file(input_file: str, output_file: str, cfg: ConvertConfig, *,
                 on_layer: ProgressFn | None = None) -> ConversionReport:
    """Convert ``input_file`` to ``output_file`` following ``cfg``; returns the per-layer report.

    Tensors are read one at a time (with ``cfg.low_memory`` straight from disk) and written through
    a streaming, atomic writer: a failure at any layer leaves no output file and the input untouched.
    """
    from .io.comfy import NATIVE_FORMATS
    from .io import NonNativeFormatWarning, SafetensorsWriter, UnifiedSafetensorsLoader, quantization_metadata
    from .selection import SelectionConfig, decide

    start = time.perf_counter()
    selection = cfg.selection if cfg.selection is not None else SelectionConfig()
    hessians = HessianSource(cfg)
    reports: list[LayerReport] = []
    entries: dict[str, dict] = {}
    kept = removed = 0
    pipes: dict = {}
    with UnifiedSafetensorsLoader(input_file, low_memory=cfg.low_memory) as loader:
        keys = list(loader.keys())
        decisions = {k: decide(k, tuple(loader.get_shape(k)), loader.get_dtype(k), selection) for k in keys}
        todo = [k for k in keys if decisions[k].action == "quantize"]
        metadata = dict(loader.metadata() or {})
        metadata.pop("_quantization_metadata", None)  # regenerated below from this run's layers
        with SafetensorsWriter(output_file, metadata=metadata, forbid=[input_file]) as writer, \
                warnings.catch_warnings():
            # The writer warns about layouts vanilla ComfyUI cannot load; here they were asked for
            # explicitly through the config, and the report notes them once instead of per layer.
            warnings.simplefilter("ignore", NonNativeFormatWarning)
            for key in keys:
                d = decisions[key]
                if d.action == "remove":
                    removed += 1
                    continue
                if d.action != "quantize":
                    writer.add(key, loader.get_tensor(key))
                    kept += 1
                    loader.mark_processed(key)
                    continue
                stem = key[: -len(".weight")] if key.endswith(".weight") else key
                if on_layer is not None:
                    on_layer(stem, len(reports), len(todo))
                t0 = time.perf_counter()
                w = loader.get_tensor(key)
                loader.mark_processed(key)
                tensors, report, entry = _convert_layer(stem, w, d, cfg, hessians, pipes)
                for name, t in tensors.items():
                    writer.add(name, t)
                if entry is not None:  # the header repeats exactly what the tensor says
                    entries[stem] = entry
                reports.append(attrs.evolve(report, seconds=time.perf_counter() - t0))
                log.debug("%s: %s", stem, report.metrics)
            if cfg.save_quant_metadata and entries:
                writer.update_metadata({"_quantization_metadata": quantization_metadata(entries)})
    notes = []
    odd = sorted({r.format for r in reports if r.format not in NATIVE_FORMATS and r.format != "fp16"})
    if odd:
        notes.append(f"formats {odd} need a custom node: vanilla ComfyUI cannot load them")
    if not cfg.comfy:
        notes.append("legacy non-comfy layout (.scale_weight): vanilla ComfyUI loads these weights unquantized")
    reports, shared = _hoist_repeated_notes(reports)
    notes = shared + notes
    for note in notes[len(shared):]:  # once per run, not once per layer
        warnings.warn(note, NonNativeFormatWarning, stacklevel=2)
    return ConversionReport(input_file=str(input_file), output_file=str(output_file), layers=tuple(reports),
                            kept=kept, removed=removed, seconds=time.perf_counter() - start,
                            quality_threshold=cfg.quality_threshold, notes=tuple(notes))
