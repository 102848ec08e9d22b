"""The ``cq`` command line (also ``python -m cq``), with the reference tool's flag names."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .presets import PRESETS

__all__ = ["main", "build_parser", "default_output_name"]

PRESET_FLAGS = tuple(PRESETS)  # the reference's 15 model flags, in its order


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser; every flag, type, choice and help comes from :data:`cq.options.OPTIONS`."""
    from .options import add_cli_options

    p = argparse.ArgumentParser(
        prog="cq", allow_abbrev=False,
        description="Convert safetensors weights to INT8 files that ComfyUI loads natively "
                    "(int8_tensorwise, float32 [N,1] scales, .comfy_quant metadata).")
    return add_cli_options(p)


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


def _dry_run(mode: str, inp: str, cfg) -> int:
    """``--dry-run``: every tensor's plan and why (analyze) or a layer-config template; no conversion."""
    from .convert import plan_model
    from .io import UnifiedSafetensorsLoader
    from .recipes import recipe_label

    with UnifiedSafetensorsLoader(inp, low_memory=True) as loader:
        if mode == "create-template":
            import json

            from .io import write_text_atomic
            from .io.layer_config import create_layer_config_template

            path = Path(inp).with_name(Path(inp).stem + "_layer_config_template.json")
            template = create_layer_config_template(loader)
            write_text_atomic(path, json.dumps(template, indent=2) + "\n")
            print(f"wrote {path} ({sum(1 for k in template if not k.startswith('_'))} layers)")
            return 0
        from .convert import open_model, resolve_selection

        view, _, input_notes = open_model(loader, cfg)
        cfg, detection, why = resolve_selection(view, cfg)
        print(detection.describe())
        print(why)
        for note in input_notes:
            print(f"note: {note}")
        counts: dict[str, int] = {}
        for p in plan_model(view, cfg):
            counts[p.action] = counts.get(p.action, 0) + 1
            recipe = f" -> {recipe_label(p.recipe)}" if p.action == "quantize" else ""
            print(f"{p.action:<10} {p.key}{recipe}  ({p.reason})" if p.reason else f"{p.action:<10} {p.key}{recipe}")
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
        writes = {"-o": out, "--report-json": args.report_json, "--report-html": args.report_html}
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
    from .convert import convert_file
    from .distributed import world_size

    if world_size() > 1:  # launched by torchrun: layer-parallel over the ranks, rank 0 writes (cq.distributed)
        from .distributed import convert_file_distributed as convert_file
    from .options import build_config, values_from_cli
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
        inp, out, cfg = build_config(values_from_cli(args, out))
        if args.dry_run:
            unused = [f for f, v in (("--report-json", args.report_json), ("--report-html", args.report_html)) if v]
            if unused:  # never silent: a dry run converts nothing, so there is no report to write
                print(f"warning: {' and '.join(unused)} not written: --dry-run converts nothing", file=sys.stderr)
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

            # Bytes, not layers: the rate and the remaining time stay right when layers differ 100x in size.
            bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=None,
                       dynamic_ncols=True)

        def progress(key, recipe, done, total):
            if bar is None:
                return
            bar.total = total
            if key is not None:
                stem = key[: -len(".weight")] if key.endswith(".weight") else key
                bar.set_postfix_str(f"{recipe or 'copy'} {stem[-40:]}", refresh=False)
            bar.update(done - bar.n)

        try:
            with warnings.catch_warnings():
                # printed as warnings under the table instead
                warnings.simplefilter("ignore", NonNativeFormatWarning)
                report = convert_file(inp, out, cfg, progress=progress)
        finally:
            if bar is not None:
                bar.close()
    except (CqError, NotImplementedError, ValueError, TypeError, OSError) as exc:
        msg = " ".join(str(exc).split())
        print(f"cq: error: {msg}", file=sys.stderr)
        return 2 if isinstance(exc, (TypeError,)) else 1
    if report is None:  # a distributed run's other ranks: rank 0 prints the table and writes the file
        return 0
    table = report.table().splitlines()
    minimal = args.verbose == "MINIMAL"
    if not minimal:
        print("\n".join(table))
        why = report.model.get("detection", {}).get("why")
        if why:
            print(f"note: {why}")
    for note in report.notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.report_json:
        from .io import write_text_atomic

        try:
            write_text_atomic(args.report_json, report.to_json(indent=2) + "\n")
        except OSError as exc:  # checked up front; this is a disk filling or a folder removed meanwhile
            print(f"wrote {out}", file=sys.stderr)
            print(f"cq: error: could not write --report-json {args.report_json}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
    if args.report_html:
        from .report_html import write_html_report

        try:
            write_html_report(report, args.report_html, settings={k: v for k, v in vars(args).items()
                                                                  if v not in (None, False) and k != "input"})
        except (OSError, ImportError) as exc:  # the path was checked up front; matplotlib is an optional extra
            print(f"wrote {out}", file=sys.stderr)
            print(f"cq: error: could not write --report-html {args.report_html}: {exc}", file=sys.stderr)
            return 1
    print(f"{table[-1]}; wrote {out}" if minimal else f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

