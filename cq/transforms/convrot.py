"""ConvRot: the block-diagonal regular-Hadamard input rotation that ComfyUI runs natively.

A layer stored with ``"convrot": true, "convrot_groupsize": G`` in its ``.comfy_quant`` holds
``W_rot = W · R`` with ``R = blockdiag(H_G, …, H_G)`` along K, where ``H_G`` is comfy-kitchen's
regular Hadamard (:func:`~cq.transforms.hadamard.regular_hadamard`, symmetric and its own inverse).
At runtime comfy-kitchen rotates activations ``x → x · R`` before its dynamic per-token int8 GEMM, and
``dequantize()`` returns ``W_rot · Rᵀ``, the original-basis weight. Rotation spreads outlier input
channels over ``G`` coordinates, which is what makes INT8 weights *and* activations accurate on
outlier-heavy layers (algorithms.md §8.7).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import attrs
import torch

from ..errors import ConfigError, CqError
from ..state import LayerState, record
from .hadamard import hessian_dtype, kron_apply, regular_hadamard, regular_hadamard_factors

__all__ = ["ConvRot", "ConvRotConfig", "convrot", "convrot_groupsizes", "rotate_hessian", "runtime_rotate"]

#: ``"auto"`` picks the largest of these that divides K (ComfyUI's default is 256).
AUTO_GROUPSIZES = (256, 64, 16)


def _is_valid_g(g: Any) -> bool:
    return (isinstance(g, int) and not isinstance(g, bool) and g >= 16 and g & (g - 1) == 0
            and (g.bit_length() - 1) % 2 == 0)


def convrot_groupsizes(k: int, *, limit: int | None = None) -> tuple[int, ...]:
    """Group sizes ConvRot can use for ``k`` input features: powers of 4 from 16 up dividing ``k``.

    Example:
        >>> convrot_groupsizes(3072), convrot_groupsizes(320), convrot_groupsizes(24)
        ((16, 64, 256, 1024), (16, 64), ())
    """
    out, g = [], 16
    while g <= k and (limit is None or g <= limit):
        if k % g == 0:
            out.append(g)
        g *= 4
    return tuple(out)


def _groupsize_validator(instance, attribute, value):
    if not _is_valid_g(value):
        raise ConfigError(f"ConvRot groupsize={value!r} must be a power of 4 from 16 up (16, 64, 256, 1024, ...); "
                          "ComfyUI's default is 256")


@attrs.frozen
class ConvRot:
    """The input rotation ``R = blockdiag(H_G)``; a native :class:`cq.state.Basis` (``W' = W·R``).

    Example:
        >>> r = ConvRot(16)
        >>> x = torch.randn(3, 32)
        >>> bool(torch.allclose(r.unrotate(r.rotate(x)), x, atol=1e-6)), dict(r.comfy_fields())
        (True, {'convrot': True, 'convrot_groupsize': 16})
    """

    groupsize: int = attrs.field(validator=_groupsize_validator)
    #: ComfyUI rotates activations by ``R`` at runtime when ``.comfy_quant`` says ``convrot``.
    native = True

    @classmethod
    def for_features(cls, k: int, groupsize: int, *, layer: str = "layer") -> "ConvRot":
        """A ConvRot for a layer with ``k`` input features, or a ConfigError listing valid sizes."""
        rot = cls(groupsize)
        if k % groupsize:
            raise ConfigError(f"{layer}: ConvRot groupsize={groupsize} does not divide in_features={k}; valid "
                              f"choices for K={k} are {list(convrot_groupsizes(k)) or 'none (K % 16 != 0)'}, "
                              "or groupsize='auto'")
        return rot

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groupsize
        k = x.shape[-1]
        if k % g:
            raise ConfigError(f"ConvRot groupsize={g} does not divide the last dim {k}; valid choices are "
                              f"{list(convrot_groupsizes(k))}")
        work = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
        # R is symmetric (H4 is), so x·R and x·Rᵀ are the same product.
        y = kron_apply(work.reshape(-1, g), regular_hadamard_factors(g))
        return y.reshape(work.shape)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x · R`` for ``x`` of shape ``[..., K]`` (float32 for low-precision inputs)."""
        return self._apply(x)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x · Rᵀ`` (equal to ``x · R``: the matrix is symmetric and its own inverse)."""
        return self._apply(x)

    def comfy_fields(self) -> Mapping[str, Any]:
        return {"convrot": True, "convrot_groupsize": self.groupsize}

    # -- cq.state.Basis --------------------------------------------------------------------
    def to_working(self, w: torch.Tensor) -> torch.Tensor:
        return self._apply(w)

    def to_original(self, w: torch.Tensor) -> torch.Tensor:
        return self._apply(w)

    def hessian_to_working(self, h: torch.Tensor) -> torch.Tensor:
        return rotate_hessian(h, self)

    def hessian_to_original(self, h: torch.Tensor) -> torch.Tensor:
        return rotate_hessian(h, self)  # R is symmetric and its own inverse

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """``x · R`` computed the way ComfyUI computes it at runtime (:func:`runtime_rotate`)."""
        return runtime_rotate(x, self.groupsize)

    def matrix(self, k: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``k × k`` block-diagonal ``R`` (tests and small layers only)."""
        if k % self.groupsize:
            raise ConfigError(f"ConvRot groupsize={self.groupsize} does not divide k={k}")
        h = regular_hadamard(self.groupsize, dtype=dtype)
        return torch.block_diag(*([h] * (k // self.groupsize)))


def runtime_rotate(x: torch.Tensor, groupsize: int) -> torch.Tensor:
    """``x · R`` for activations ``x`` [..., K], computed as comfy-kitchen does at runtime.

    comfy-kitchen multiplies each group of ``G`` features by the dense ``G × G`` matrix in the
    activations' dtype (one batched matmul); :meth:`ConvRot.rotate` uses Kronecker factors instead.
    Both are ``x · R`` to ~1e-6, but the per-token int8 codes cq's W8A8 metric computes from the
    rotated activations flip wherever a value sits that close to a rounding tie; with the runtime's
    own product the metric reports the runtime's figure (issue 8.2). The entries ``±1/√G`` are
    powers of two, so the matrix itself is exact in any float dtype. float16/bfloat16 inputs are
    rotated in float32 (cq's metric works in float32; the runtime's own dtype is the caller's choice).

    Example:
        >>> x = torch.randn(3, 32)
        >>> bool(torch.allclose(runtime_rotate(x, 16), ConvRot(16).rotate(x), atol=1e-5))
        True
    """
    if not _is_valid_g(groupsize):
        raise ConfigError(f"ConvRot groupsize={groupsize!r} must be a power of 4 from 16 up (16, 64, 256, ...)")
    k = x.shape[-1]
    if k % groupsize:
        raise ConfigError(f"ConvRot groupsize={groupsize} does not divide the last dim {k}; valid choices are "
                          f"{list(convrot_groupsizes(k))}")
    work = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
    h = regular_hadamard(groupsize, dtype=work.dtype)
    return torch.matmul(work.reshape(-1, k // groupsize, groupsize), h).reshape(work.shape)


def _config_groupsize(instance, attribute, value):
    if value != "auto" and not _is_valid_g(value):
        raise ConfigError(f"ConvRotConfig groupsize={value!r} must be 'auto' or a power of 4 from 16 up "
                          "(16, 64, 256, 1024, ...)")


@attrs.frozen
class ConvRotConfig:
    """How :func:`convrot` picks the group size.

    ``groupsize``: an explicit power of 4 (16, 64, 256, …; it must divide K, else ConfigError listing
    the valid choices), or ``"auto"`` (default): the largest of 256, 64, 16 dividing K — 256, ComfyUI's
    default, whenever K allows. With ``"auto"`` a layer whose K is not a multiple of 16 is left
    unrotated, with a note.
    """

    groupsize: int | Literal["auto"] = attrs.field(default="auto", validator=_config_groupsize)


def rotate_hessian(hessian: torch.Tensor, rotation) -> torch.Tensor:
    """``Rᵀ H R``, symmetrized, returned in ``hessian``'s dtype (``rotation``: anything with ``rotate``, e.g. :class:`ConvRot`).

    Computed in float64 up to K = 4096 and in float32 above (:func:`~cq.transforms.hadamard.hessian_dtype`).

    With ``W' = W R`` this keeps the proxy loss invariant: ``tr(W' H' W'ᵀ) = tr(W H Wᵀ)``.
    """
    h = hessian.to(hessian_dtype(hessian.shape[-1]))
    hr = rotation.rotate(h)  # H·R (rows of H times R)
    out = rotation.rotate(hr.t().contiguous()).t()  # (H R)ᵀ R, transposed back = Rᵀ H R
    return ((out + out.t()) * 0.5).to(hessian.dtype)


def convrot(state: LayerState, *, cfg: ConvRotConfig = ConvRotConfig()) -> LayerState:
    """Rotate the layer's input basis with ConvRot: ``weight → W·R``, ``hessian → Rᵀ H R``.

    ``original`` stays the original-basis weight (what metrics compare against) and
    ``state.basis`` is set, so :func:`~cq.transforms.rounding.reconstruct` and the file writer
    (``.comfy_quant`` gets ``convrot``/``convrot_groupsize``) know about it. Put it before the scale
    and rounding stages.

    Example:
        >>> from cq.transforms import absmax_scale, round_to_nearest, reconstruct
        >>> w = torch.randn(4, 64)
        >>> s = round_to_nearest(absmax_scale(convrot(LayerState.from_weight("fc", w))))
        >>> s.basis, float((reconstruct(s) - w).abs().max()) < 0.05
        (ConvRot(groupsize=64), True)
    """
    if state.codes is not None:
        raise CqError(f"{state.name}: convrot must come before quantization (the state already has codes); "
                      "put convrot before absmax_scale/round_to_nearest in the pipeline")
    if state.basis is not None:
        raise CqError(f"{state.name}: the layer is already rotated ({state.basis!r}); apply one rotation only")
    n, k = state.shape
    if cfg.groupsize == "auto":
        choices = [g for g in AUTO_GROUPSIZES if k % g == 0]
        if not choices:
            return record(state, "convrot", cfg,
                          note=f"ConvRot skipped: in_features={k} is not a multiple of 16; layer left unrotated")
        rot = ConvRot(choices[0])
    else:
        rot = ConvRot.for_features(k, cfg.groupsize, layer=state.name)
    w = state.weight
    w_rot = rot.rotate(w if w.dtype in (torch.float32, torch.float64) else w.to(torch.float32))
    h = None if state.hessian is None else rotate_hessian(state.hessian, rot)
    original = state.original if state.original is not None else state.weight
    return record(state, "convrot", cfg, weight=w_rot, hessian=h, original=original, basis=rot)
