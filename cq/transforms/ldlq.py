"""LDLQ (Chee et al., QuIP 2023): rounding with linear feedback from the LDL factor of the Hessian."""

from __future__ import annotations

import attrs
import torch

from ..kernels import Backend
from ..state import LayerState
from .._validators import backend as _backend_converter
from .gptq import _block, _damping, _precision
from .hessian import DampingConfig, feedback_columns, feedback_round

__all__ = ["LDLQConfig", "ldlq", "ldlq_solve"]


@attrs.frozen
class LDLQConfig:
    """How :func:`ldlq` rounds; the fields mean the same as in :class:`~cq.transforms.gptq.GPTQConfig`.

    Example:
        >>> LDLQConfig().damping.percdamp
        0.01
    """

    damping: DampingConfig = attrs.field(factory=DampingConfig, validator=_damping)
    actorder: bool = False
    block_size: int = attrs.field(default=128, validator=_block)
    lazy_batch: bool = True
    precision: str = attrs.field(default="auto", validator=_precision)
    never_worse_than_rtn: bool = True
    metrics: bool = True
    backend: Backend = attrs.field(default=Backend.AUTO, converter=_backend_converter)


def ldlq_solve(wt: torch.Tensor, s32: torch.Tensor, lower_rev: torch.Tensor, block_size: int,
               inner: int, *, backend: Backend | str = Backend.AUTO) -> torch.Tensor:
    """LDLQ on a transposed weight ``wt`` [K, N] (updated in place) given ``C``, ``J H J = C Cᵀ``.

    With ``H = Mᵀ D M`` (``M`` unit lower), column ``k`` is rounded as
    ``ŵ_k = Q(w_k + Σ_{j<k} M_kj (w_j − ŵ_j))``: the feedback uses the *true* errors of the
    earlier columns, and needs only the Cholesky factor (no triangular inverse).
    """
    # coef = −Mᵀ with M = J (C·diag(1/C_jj))ᵀ J (see ldl_from_reversed_cholesky), stored as M is
    # (row-major M, so coef is a column-major view): two K² passes (divide, one flipping copy)
    # instead of four, and the same bits and layout (the GEMMs see the same operands).
    neg_unit = lower_rev.div(lower_rev.diagonal().unsqueeze(0)).neg_()
    coef = neg_unit.t().flip(0, 1).t()
    del neg_unit
    targets = wt.clone()
    return feedback_columns(wt, s32, coef, block_size=block_size, inner=inner, targets=targets,
                            backend=backend)


def ldlq(state: LayerState, *, cfg: LDLQConfig = LDLQConfig()) -> LayerState:
    """Write LDLQ codes for ``state.weight`` with the fixed ``state.scale``, minimizing ``tr(E H Eᵀ)``.

    Same contract, notes and metrics as :func:`~cq.transforms.gptq.gptq_update`; LDLQ and GPTQ
    produce the same codes (QuIP, Theorem 6) up to float ties. In a rotated state (QuIP,
    convrot) weight and Hessian are both in the rotated basis.

    Example:
        >>> from cq.transforms import absmax_scale
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 16, generator=g) @ torch.randn(16, 16, generator=g)
        >>> s = LayerState.from_weight("fc", torch.randn(8, 16, generator=g), hessian=2 / 256 * x.T @ x)
        >>> m = ldlq(absmax_scale(s)).metrics
        >>> m["rel_out_h"] < m["rel_out_rtn_h"]
        True

    References:
        Chee, Cai, Kuleshov, De Sa. "QuIP: 2-Bit Quantization of Large Language Models With
        Guarantees", NeurIPS 2023 (arXiv:2307.13304).
    """
    return feedback_round(state, cfg, stage="ldlq", solve=ldlq_solve, fed_back=True)
