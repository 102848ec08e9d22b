"""The reference tool's converter classes, as thin facades over cq pipelines."""

from .learned_rounding import ConvertResult, LearnedRoundingConverter

__all__ = ["LearnedRoundingConverter", "ConvertResult", "GPTQInt8Converter", "QuIPInt8Converter"]


def __getattr__(name):  # the GPTQ/QuIP modules pull in their transforms only when used
    if name == "GPTQInt8Converter":
        from .gptq import GPTQInt8Converter

        return GPTQInt8Converter
    if name == "QuIPInt8Converter":
        from .quip import QuIPInt8Converter

        return QuIPInt8Converter
    raise AttributeError(f"module 'cq.converters' has no attribute {name!r}")
