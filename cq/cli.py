"""The ``cq`` command line (also ``python -m cq``), with the reference tool's flag names."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .config import SCALING_MODES
from .presets import PRESETS

__all__ = ["main", "build_parser", "default_output_name"]

PRESET_FLAGS = tuple(PRESETS)  # the reference's 15 model flags, in its order
LEARNED_ROUNDING_FLAGS = ("num_iter", "lr", "lr_schedule", "top_p", "min_k", "max_k", "lr_gamma", "lr_patience",
                          "lr_factor", "lr_min", "lr_cooldown", "lr_threshold", "lr_adaptive_mode",
                          "lr_shape_influence", "lr_threshold_mode", "early_stop_loss", "early_stop_lr",
                          "early_stop_stall")


def _flag(parser, *names, **kw):
    """Add a flag under its reference name plus the dash/underscore twin (``--block_size`` / ``--block-size``)."""
    longs = [n for n in names if n.startswith("--")]
    extra = []
    for n in longs:
        twin = "--" + (n[2:].replace("_", "-") if "_" in n else n[2:].replace("-", "_"))
        if twin not in names and twin not in extra:
            extra.append(twin)
    return parser.add_argument(*names, *extra, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cq", allow_abbrev=False,
        description="Convert safetensors weights to INT8 files that ComfyUI loads natively "
                    "(int8_tensorwise, float32 [N,1] scales, .comfy_quant metadata).")
    io = p.add_argument_group("files")
    _flag(io, "-i", "--input", required=True, help="input .safetensors file")
    _flag(io, "-o", "--output", help="output file (default: the reference's automatic name next to the input)")
    _flag(io, "--report-json", dest="report_json", help="also write the per-layer report as JSON to this path")

    fmt = p.add_argument_group("output format")
    _flag(fmt, "--comfy_quant", action="store_true", default=True,
          help="ComfyUI format with .comfy_quant tensors (the default; kept for the reference's scripts)")
    _flag(fmt, "--legacy-format", dest="legacy_format", action="store_true",
          help="the reference's non-comfy layout (.scale_weight); vanilla ComfyUI loads it unquantized")
    _flag(fmt, "--int8", action="store_true", help="INT8 target (the default)")
    _flag(fmt, "--fp16", action="store_true", help="store eligible weights as float16 instead of INT8")
    _flag(fmt, "--scaling_mode", choices=list(SCALING_MODES), default=None,
          help="scale layout: row (default, [N,1]), axis (= row), tensor (()), block (int8_blockwise tiles, "
               "custom nodes only)")
    _flag(fmt, "--block_size", type=int, default=None, help="tile size for --scaling_mode block (128)")
    _flag(fmt, "--legacy-axiswise", dest="legacy_axiswise", action="store_true",
          help="write per-row scales as [N] 'int8_axiswise' for the fork's custom nodes (vanilla ComfyUI fails)")
    _flag(fmt, "--full_precision_matrix_mult", action="store_true",
          help="mark every layer full_precision_matrix_mult in .comfy_quant")
    _flag(fmt, "--save-quant-metadata", dest="save_quant_metadata", action="store_true",
          help="also write the _quantization_metadata header (same entries as the .comfy_quant tensors)")
    _flag(fmt, "--input_scale", dest="include_input_scale", action="store_true",
          help="legacy format only: write scale_input = 1")

    sel = p.add_argument_group("which layers")
    for name in PRESET_FLAGS:
        _flag(sel, f"--{name}", action="store_true", help=f"model preset: keep {name}'s sensitive layers")
    _flag(sel, "--exclude-layers", dest="exclude_layers", help="regex (re.search on the key): keep these layers")
    _flag(sel, "--custom-layers", dest="custom_layers", help="regex: layers converted with the --custom-* settings")
    _flag(sel, "--custom-type", dest="custom_type", choices=["int8", "fp16"])
    _flag(sel, "--custom-block-size", dest="custom_block_size", type=int)
    _flag(sel, "--custom-scaling-mode", dest="custom_scaling_mode", choices=list(SCALING_MODES))
    _flag(sel, "--custom-simple", dest="custom_simple", action="store_true")
    _flag(sel, "--custom-heur", dest="custom_heur", action="store_true")
    _flag(sel, "--fallback", choices=["int8", "fp16"], help="format for excluded/preset-kept layers")
    _flag(sel, "--fallback-block-size", dest="fallback_block_size", type=int)
    _flag(sel, "--fallback-simple", dest="fallback_simple", action="store_true")
    _flag(sel, "--heur", dest="skip_inefficient_layers", action="store_true",
          help="skip layers too small (or not tileable by the block size) to benefit")
    _flag(sel, "--layer-config", dest="layer_config", help="per-layer JSON config (regex keys)")
    _flag(sel, "--fullmatch", dest="layer_config_fullmatch", action="store_true")

    alg = p.add_argument_group("rounding")
    _flag(alg, "--optimizer", choices=["rtn", "gptq", "quip", "original", "adamw", "radam"], default=None,
          help="rtn (default), gptq, quip; original/adamw/radam (learned rounding) are not implemented yet")
    _flag(alg, "--simple", action="store_true",
          help="no learned rounding (cq never runs it unasked); names the output simple_*")
    _flag(alg, "--calibration-data", dest="calibration_data_path",
          help="calibration file (cq format from `cq.calibrate`, or the reference's .json/.safetensors)")
    _flag(alg, "--calibration-lora", dest="calibration_lora_path",
          help="LoRA rows for the reference's synthetic Hessians (not data-aware)")
    _flag(alg, "--calib_samples", type=int, default=6144, help="rows of synthetic calibration data")
    _flag(alg, "--manual_seed", type=int, default=-1, help="seed (-1: 0, cq is always deterministic)")
    _flag(alg, "--gptq-actorder", dest="gptq_actorder", action="store_true")
    _flag(alg, "--gptq-fast", dest="gptq_fast", action=argparse.BooleanOptionalAction, default=True)
    _flag(alg, "--gptq-turbo", dest="gptq_turbo", action="store_true")
    _flag(alg, "--quip-actorder", dest="quip_actorder", action=argparse.BooleanOptionalAction, default=True)
    _flag(alg, "--quip-hadamard", dest="quip_hadamard", action=argparse.BooleanOptionalAction, default=True)
    _flag(alg, "--quip-seed", dest="quip_seed", type=int, default=None)
    _flag(alg, "--quip-store-transformed", dest="quip_store_transformed", action="store_true")
    _flag(alg, "--quip-requant-scheme", dest="quip_requant_scheme", choices=["tensor", "block"], default="tensor")
    _flag(alg, "--quip-requant-tensor-per-row", dest="quip_requant_tensor_per_row",
          action=argparse.BooleanOptionalAction, default=True)
    _flag(alg, "--quip-checkpointed", dest="quip_checkpointed", action="store_true")
    _flag(alg, "--quip-checkpoint-threshold", dest="quip_checkpoint_threshold", type=int, default=8192)
    _flag(alg, "--quip-checkpoint-segments", dest="quip_checkpoint_segments", type=int, default=4)
    _flag(alg, "--smoothquant", action="store_true", help="not implemented yet")
    _flag(alg, "--smoothquant-alpha", dest="smoothquant_alpha", type=float, default=0.5)
    for name in LEARNED_ROUNDING_FLAGS + ("full_matrix",):
        kw = {"action": "store_true", "default": None} if name == "full_matrix" else {"default": None}
        _flag(alg, f"--{name}", dest=name, help=argparse.SUPPRESS, **kw)

    lora = p.add_argument_group("LoRA merging (not implemented yet)")
    _flag(lora, "--merge-lora", dest="merge_lora_path")
    _flag(lora, "--merge-loras", dest="merge_lora_paths", nargs="+")
    _flag(lora, "--merge-lora-scale", dest="merge_lora_scale", type=float, default=1.0)
    _flag(lora, "--merge-lora-dampen", dest="merge_lora_dampen", action=argparse.BooleanOptionalAction, default=True)

    run = p.add_argument_group("run")
    _flag(run, "--low-memory", dest="low_memory", action="store_true", help="read each tensor from disk on demand")
    _flag(run, "--streaming-mode", dest="streaming_mode", default="balanced",
          choices=["off", "minimal", "balanced", "aggressive", "auto"])
    _flag(run, "--no-memory-limits", dest="no_memory_limits", action="store_true")
    _flag(run, "--report-quality", dest="report_quality", action="store_true",
          help="(always on) print the per-layer quality table")
    _flag(run, "--quality-threshold", dest="quality_threshold", type=float, default=30.0)
    _flag(run, "--backend", default="auto", choices=["auto", "torch", "triton"])
    _flag(run, "--verbose", default="NORMAL", choices=["DEBUG", "VERBOSE", "NORMAL", "MINIMAL"])
    _flag(run, "--no-progress", dest="no_progress", action="store_true")
    _flag(run, "--dry-run", dest="dry_run", nargs="?", const="analyze", choices=["analyze", "create-template"],
          help="analyze: print what would happen to every tensor and write nothing; create-template: write "
               "<input>_layer_config_template.json (a loadable --layer-config) and exit")
    return p


def default_output_name(args: argparse.Namespace) -> str:
    """The automatic name, in the reference's pattern but true to what runs.

    ``{stem}_{method}_{int8|fp16}{mixed}{_bs<N>}.safetensors``: ``method`` is ``simple`` for
    round-to-nearest and ``gptq``/``quip`` for those optimizers (cq never runs learned rounding
    unasked, so it never writes the reference's ``learned_``), and ``_bs<N>`` appears only when
    block scaling is what the file holds.

    Example:
        >>> args = build_parser().parse_args(["-i", "m.safetensors"])
        >>> default_output_name(args), default_output_name(build_parser().parse_args(
        ...     ["-i", "m.safetensors", "--optimizer", "gptq", "--scaling_mode", "block", "--block_size", "64"]))
        ('m_simple_int8.safetensors', 'm_gptq_int8_bs64.safetensors')
    """
    inp = Path(args.input)
    mixed = (any(getattr(args, f) for f in PRESET_FLAGS) or bool(args.custom_layers) or bool(args.exclude_layers)
             or bool(args.layer_config))
    kind = "fp16" if args.fp16 else "int8"
    optimizer = args.optimizer or "rtn"
    method = {"rtn": "simple", "gptq": "gptq", "quip": "quip"}.get(optimizer, "learned")
    bs = f"_bs{args.block_size or 128}" if kind == "int8" and args.scaling_mode == "block" else ""
    name = f"{inp.stem}_{method}_{kind}{'mixed' if mixed else ''}{bs}.safetensors"
    return str(inp.with_name(name))


def _kwargs(args: argparse.Namespace) -> dict:
    kw = dict(
        input_file=args.input, output_file=args.output or default_output_name(args),
        comfy_quant=not args.legacy_format, filter_flags={f: True for f in PRESET_FLAGS if getattr(args, f)},
        calib_samples=args.calib_samples, seed=max(args.manual_seed, 0), fp16=args.fp16,
    )
    names = ("fallback", "custom_layers", "exclude_layers", "custom_type", "custom_block_size",
             "custom_scaling_mode", "custom_simple", "custom_heur", "fallback_block_size", "fallback_simple",
             "full_precision_matrix_mult", "skip_inefficient_layers", "include_input_scale", "save_quant_metadata",
             "layer_config_fullmatch", "low_memory", "streaming_mode", "no_memory_limits",
             "quality_threshold", "smoothquant", "smoothquant_alpha", "calibration_data_path", "calibration_lora_path",
             "gptq_actorder", "gptq_fast", "gptq_turbo", "quip_actorder", "quip_hadamard", "quip_seed",
             "quip_store_transformed", "quip_requant_scheme", "quip_requant_tensor_per_row", "quip_checkpointed",
             "quip_checkpoint_threshold", "quip_checkpoint_segments", "merge_lora_path", "merge_lora_paths",
             "merge_lora_scale", "merge_lora_dampen")
    kw.update({n: getattr(args, n) for n in names})
    if args.layer_config:
        from .layer_config import load_layer_config

        kw["layer_config"] = load_layer_config(args.layer_config)
    for name in LEARNED_ROUNDING_FLAGS + ("full_matrix",):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    optimizer = args.optimizer or "rtn"  # like the reference, --simple leaves GPTQ/QuIP on
    kw.update(optimizer=optimizer, scaling_mode=args.scaling_mode, block_size=args.block_size,
              legacy_axiswise=args.legacy_axiswise, backend=args.backend)
    return kw


def _dry_run(mode: str, inp: str, cfg) -> int:
    """``--dry-run``: decisions for every tensor (analyze) or a layer-config template; no conversion."""
    from .io import UnifiedSafetensorsLoader
    from .selection import SelectionConfig, iter_decisions

    with UnifiedSafetensorsLoader(inp, low_memory=True) as loader:
        if mode == "create-template":
            import json

            from .io import write_text_atomic
            from .layer_config import create_layer_config_template

            path = Path(inp).with_name(Path(inp).stem + "_layer_config_template.json")
            template = create_layer_config_template(loader)
            write_text_atomic(path, json.dumps(template, indent=2) + "\n")
            print(f"wrote {path} ({sum(1 for k in template if not k.startswith('_'))} layers)")
            return 0
        counts: dict[str, int] = {}
        for key, d in iter_decisions(loader, cfg.selection or SelectionConfig()):
            counts[d.action] = counts.get(d.action, 0) + 1
            target = f" -> {d.target or cfg.target}" if d.action == "quantize" else ""
            print(f"{d.action:<9} {key}{target}  ({d.reason})" if d.reason else f"{d.action:<9} {key}{target}")
    print(", ".join(f"{n} {a}" for a, n in sorted(counts.items())) + "; nothing written (dry run)")
    return 0


class _Terminated(BaseException):
    """Raised from a SIGTERM/SIGHUP handler so the same clean-up as Ctrl-C runs (temp files removed)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _output_roles(args: argparse.Namespace, out: str) -> tuple[dict, dict]:
    """(files the run reads, files it writes), keyed by the flag that named them."""
    reads = {"-i": args.input, "--calibration-data": args.calibration_data_path,
             "--calibration-lora": args.calibration_lora_path, "--layer-config": args.layer_config,
             "--merge-lora": args.merge_lora_path, "--merge-loras": args.merge_lora_paths}
    if args.dry_run == "create-template":  # the same name _dry_run writes
        inp = Path(args.input)
        writes = {"--dry-run create-template": str(inp.with_name(inp.stem + "_layer_config_template.json"))}
    elif args.dry_run:
        writes = {}
    else:
        writes = {"-o": out, "--report-json": args.report_json}
    return reads, writes


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status.

    0: success (also an input with nothing to quantize); 1: the input or a setting cannot be used
    (one ``cq: error:`` line, nothing written); 2: bad usage (argparse, or an output path that
    would overwrite an input or cannot be written); 130: Ctrl-C; 129/143: SIGHUP/SIGTERM. On every
    non-zero status no output file exists: outputs are written to a temporary file and renamed last.
    """
    import signal

    def on_signal(signum, frame):
        raise _Terminated(signum)

    previous = {}
    try:
        for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
            if sig is not None:
                try:
                    previous[sig] = signal.signal(sig, on_signal)
                except ValueError:  # not the main thread (main() called from a worker): leave signals alone
                    pass
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before or after the conversion's own handler
        print("cq: interrupted; no output was written", file=sys.stderr)
        return 130
    except _Terminated as t:
        name = signal.Signals(t.signum).name
        print(f"cq: stopped by {name}; no output was written", file=sys.stderr)
        return 128 + t.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .logs import setup_logging

    setup_logging(args.verbose)
    from .api import config_from_legacy_kwargs
    from .convert import convert_file
    from .errors import CqError
    from .io import NonNativeFormatWarning
    from .io.paths import check_outputs

    out = args.output or default_output_name(args)
    try:
        # Before anything is read or computed: an output that would replace an input, or a report
        # path that would fail only after the model was written, is refused now.
        check_outputs(*_output_roles(args, out))
    except CqError as exc:
        print(f"cq: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        inp, out, cfg = config_from_legacy_kwargs(**_kwargs(args))
        if args.dry_run:
            return _dry_run(args.dry_run, inp, cfg)
        from .io import UnifiedSafetensorsLoader
        from .selection import SelectionConfig, iter_decisions

        with UnifiedSafetensorsLoader(inp, low_memory=True) as loader:
            n_tensors = len(loader)
            todo = sum(1 for _, d in iter_decisions(loader, cfg.selection or SelectionConfig())
                       if d.action == "quantize")
        if not todo:
            print(f"cq: nothing to quantize in {inp}: none of its {n_tensors} tensors is a 2-D weight selected "
                  "for conversion (see --dry-run); no output written")
            return 0
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=0, unit="layer", file=sys.stderr, disable=None, dynamic_ncols=True)

        def on_layer(stem, i, total):
            if bar is not None:
                bar.total = total
                bar.set_postfix_str(stem[-40:], refresh=False)
                bar.update(1 if i else 0)

        try:
            with warnings.catch_warnings():
                # printed as notes under the table instead
                warnings.simplefilter("ignore", NonNativeFormatWarning)
                report = convert_file(inp, out, cfg, on_layer=on_layer)
        finally:
            if bar is not None:
                bar.update(bar.total - bar.n) if bar.total else None
                bar.close()
    except (CqError, NotImplementedError, ValueError, TypeError, OSError) as exc:
        msg = " ".join(str(exc).split())
        print(f"cq: error: {msg}", file=sys.stderr)
        return 2 if isinstance(exc, (TypeError,)) else 1
    print(report.table())
    for note in report.notes:
        print(f"note: {note}")
    if args.report_json:
        from .io import write_text_atomic

        try:
            write_text_atomic(args.report_json, report.to_json(indent=2) + "\n")
        except OSError as exc:  # checked up front; this is a disk filling or a folder removed meanwhile
            print(f"wrote {out}", file=sys.stderr)
            print(f"cq: error: could not write --report-json {args.report_json}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

