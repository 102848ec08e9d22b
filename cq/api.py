"""``convert_to_int8``: the reference tool's function, as a thin facade over :mod:`cq.options`.

The signature is the reference's (50 named parameters plus ``**converter_kwargs``), generated
from the one option table; every value goes where its row says, or raises naming the capability
when cq does not have it. Nothing is silently ignored.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from .options import CONVERTER_KWARGS, FACADE_PARAMETERS, REQUIRED, build_config
from .report import ConversionReport

__all__ = ["convert_to_int8", "config_from_legacy_kwargs", "FACADE_PARAMETERS", "CONVERTER_KWARGS"]

log = logging.getLogger("cq.api")


def config_from_legacy_kwargs(**kw: Any):
    """Map the reference's keyword arguments onto ``(input_file, output_file, ConvertConfig)``.

    Example:
        >>> _, _, cfg = config_from_legacy_kwargs(input_file="a.safetensors", output_file="b.safetensors",
        ...     comfy_quant=True, filter_flags={}, calib_samples=6144, seed=42)
        >>> cfg.recipe, cfg.seed
        (RTN(granularity=PerRow()), 42)
    """
    unknown = sorted(set(kw) - set(FACADE_PARAMETERS) - set(CONVERTER_KWARGS))
    if unknown:
        raise TypeError(f"convert_to_int8() got unexpected keyword arguments {unknown}; "
                        "see cq.options.OPTIONS for the accepted names")
    missing = [n for n, o in FACADE_PARAMETERS.items() if o.default is REQUIRED and n not in kw]
    if missing:
        raise TypeError(f"convert_to_int8() missing required arguments {missing}")
    return build_config(kw)


def _signature() -> inspect.Signature:
    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=inspect.Parameter.empty if o.default is REQUIRED else o.default)
              for name, o in FACADE_PARAMETERS.items()]
    params.append(inspect.Parameter("converter_kwargs", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params, return_annotation=ConversionReport)


_SIGNATURE = _signature()


def convert_to_int8(*args: Any, **kwargs: Any) -> ConversionReport:
    """Convert a safetensors file to INT8 (the reference's signature); returns a :class:`ConversionReport`.

    With no optimizer or scaling option the output is ComfyUI-native ``int8_tensorwise`` with
    per-row ``[N, 1]`` float32 scales and round-to-nearest codes. ``report_quality=True`` logs the
    per-layer table (logger ``cq``).

    Example:
        >>> report = convert_to_int8("model.safetensors", "model_int8.safetensors", comfy_quant=True,
        ...                          filter_flags={}, calib_samples=6144, seed=42)  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    try:
        bound = _SIGNATURE.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"convert_to_int8(): {exc}") from None
    values = {k: v for k, v in bound.arguments.items() if k != "converter_kwargs"}
    values.update(bound.arguments.get("converter_kwargs", {}))
    inp, out, cfg = config_from_legacy_kwargs(**values)
    from .convert import convert_file

    html = values.get("report_html")
    if html:
        from .io.paths import check_outputs

        reads = {"input_file": inp, "calibration_data_path": values.get("calibration_data_path"),
                 "calibration_lora_path": values.get("calibration_lora_path"), "merge_loras": list(cfg.merge_loras)}
        check_outputs(reads, {"output_file": out, "report_html": html})  # before the long run, not after it
    report = convert_file(inp, out, cfg)
    if values.get("report_quality"):
        log.info("%s", report.table())
    if html:
        from .report_html import write_html_report

        write_html_report(report, html, settings={k: v for k, v in values.items() if k not in ("input_file", "output_file")})
    return report


convert_to_int8.__signature__ = _SIGNATURE
