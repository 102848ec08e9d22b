"""Named per-layer pipelines: the recipes the facade, the CLI and the converter classes are built from."""

from __future__ import annotations

import torch

from .errors import ConfigError
from .kernels import Backend
from .pipeline import Pipeline, pipeline, stage
from .state import Granularity, LayerState, PerRow
from .transforms import (MetricsConfig, RoundConfig, ScaleConfig, absmax_scale, check_finite, fp16_cast, measure,
                         round_to_nearest)

__all__ = ["rtn_pipeline", "fp16_pipeline", "optimizer_pipeline", "metrics_inputs", "measure_stage"]


def rtn_pipeline(granularity: Granularity = PerRow(), *, backend: Backend | str = Backend.AUTO) -> Pipeline:
    """check_finite → absmax_scale → round_to_nearest: cq's default INT8 recipe.

    Example:
        >>> rtn_pipeline().names
        ('check_finite', 'absmax_scale', 'round_to_nearest')
    """
    return pipeline(check_finite, stage(absmax_scale, ScaleConfig(granularity)),
                    stage(round_to_nearest, RoundConfig(backend)))


def fp16_pipeline() -> Pipeline:
    """check_finite → fp16_cast (the reference's ``--fp16`` target)."""
    return pipeline(check_finite, fp16_cast)


def optimizer_pipeline(optimizer: str, granularity: Granularity, *, gptq=None, quip=None,
                       backend: Backend | str = Backend.AUTO) -> Pipeline:
    """The INT8 pipeline for ``optimizer`` ("rtn", "gptq", "quip")."""
    if optimizer == "rtn":
        return rtn_pipeline(granularity, backend=backend)
    if optimizer == "gptq":
        from .converters.gptq import gptq_pipeline
        from .transforms.gptq import GPTQConfig

        return gptq_pipeline(granularity=granularity, gptq=gptq or GPTQConfig())
    if optimizer == "quip":
        from .transforms.quip import QuIPConfig, quip_pipeline

        return quip_pipeline(quip or QuIPConfig())
    if optimizer in ("original", "adamw", "radam"):
        raise NotImplementedError(
            f"optimizer={optimizer!r} is learned rounding, which cq does not implement yet; "
            "use optimizer='gptq' with calibration data (better at INT8), or leave it unset for round-to-nearest"
        )
    raise ConfigError(f"optimizer={optimizer!r} is not one of ['rtn', 'gptq', 'quip']")


def metrics_inputs(state: LayerState, tokens: int, seed: int) -> torch.Tensor | None:
    """Input rows for a layer's output and W8A8 metrics.

    With a Hessian ``H = 2/T·XᵀX`` the rows are Gaussian with the calibration's second moments
    (``x = z·Lᵀ``, ``L Lᵀ = H/2``), so the W8A8 error reflects the layer's real input scales and
    outlier channels; without one they are standard Gaussian. Seeded per layer name: reproducible.
    """
    if tokens <= 0:
        return None
    k = state.shape[1]
    g = torch.Generator().manual_seed((seed * 1_000_003 + sum(map(ord, state.name))) % 2**63)
    z = torch.randn(tokens, k, generator=g, dtype=torch.float64)
    h = state.hessian
    if h is None:
        return z.to(torch.float32)
    if state.basis is not None:  # the Hessian is in the working basis; inputs are in the original one
        h = state.basis.hessian_to_original(h.to(torch.float32))
    cov = h.to(torch.float64) / 2
    cov = cov + torch.eye(k, dtype=torch.float64) * (1e-8 * float(cov.diagonal().mean().clamp(min=1e-30)))
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        return z.to(torch.float32)
    return (z @ chol.t()).to(torch.float32)


def measure_stage(state: LayerState, tokens: int, seed: int, backend: Backend | str = Backend.AUTO):
    """A ``measure`` stage bound to this layer's metric inputs."""
    return stage(measure, MetricsConfig(x=metrics_inputs(state, tokens, seed), backend=backend))
