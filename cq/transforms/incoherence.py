"""QuIP incoherence processing: a seeded two-sided orthogonal rotation of W and H, and its exact inverse.

Forward (in this order; ``d`` optional diagonal rescaling, ``π`` optional column permutation)::

    W₁ = W · diag(d)            H₁ = diag(1/d) · H · diag(1/d)
    W₂ = U · W₁ · Vᵀ            H₂ = V · H₁ · Vᵀ
    W' = W₂[:, π]               H' = H₂[π][:, π]

so ``tr(W' H' W'ᵀ) = tr(W H Wᵀ)`` and any rounding error ``E'`` made in the transformed basis maps
back to an error with the same proxy loss. ``U`` ([N, N]) and ``V`` ([K, K]) are randomized Hadamard
transforms (``use_hadamard=True``; any size, see :mod:`cq.transforms.hadamard`) or Kronecker products
of seeded Haar-random orthogonal factors (``use_hadamard=False``; the original QuIP transform).
The inverse undoes the steps in reverse order: ``W₂ = W'[:, π⁻¹]``, ``W₁ = Uᵀ W₂ V``, ``W = W₁ / d``
(the reference undid the permutation *after* the rotation on its non-Hadamard path, which is why that
path returned garbage).

ComfyUI can only rotate activations on the input side (ConvRot), so a two-sided state cannot be
written natively: the transform is the layer's ``state.basis`` (an :class:`Incoherence`, whose
``native`` is False). Map results back with
:func:`~cq.transforms.rounding.reconstruct` or :func:`undo_incoherence`, or store them with
:func:`cq.transforms.quip.quip_extra_tensors` for a custom loader.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs
import torch

from ..errors import ConfigError, CqError
from ..state import LayerState, record
from .hadamard import KroneckerOrthogonal, hessian_dtype, orthogonal_transform
from .rounding import reconstruct

__all__ = ["IncoherenceConfig", "Incoherence", "make_incoherence", "incoherence", "undo_incoherence",
           "rescale_factors"]

#: The reference's clamp for the diagonal rescaling factors (QuIP's ``(diag H / diag WᵀW)^¼``).
RESCALE_CLAMP = (0.1, 10.0)


def _seed(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"seed={value!r} must be an int >= 0 (the QuIP seed; None in the legacy API means 0)")


def _flag(instance, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name}={value!r} must be True or False")


@attrs.frozen
class IncoherenceConfig:
    """How :func:`incoherence` builds its transform.

    ``seed``: seeds the one ``torch.Generator`` that draws, in order, U's signs and random factors,
    V's, then the permutation (the same seed gives the same transform for a given shape).
    ``use_hadamard``: randomized Hadamard (default) or a Kronecker product of random orthogonals.
    ``rescale``: QuIP's diagonal rescaling ``d_j = clamp((H_jj / ‖W_:j‖²)^¼, 0.1, 10)``; it needs a
    Hessian (skipped with a note when the state has none).
    ``permute``: a random column permutation after the rotation (it only changes the order in which
    LDLQ visits columns; stored codes are un-permuted by :func:`cq.transforms.quip.quip_extra_tensors`).
    """

    seed: int = attrs.field(default=0, validator=_seed)
    use_hadamard: bool = attrs.field(default=True, validator=_flag)
    rescale: bool = attrs.field(default=True, validator=_flag)
    permute: bool = attrs.field(default=True, validator=_flag)


def _t(x):
    return "None" if x is None else f"Tensor{list(x.shape)}"


@attrs.frozen(eq=False)
class Incoherence:
    """The two-sided transform of one layer: ``U = u.matrix()ᵀ``, ``V = v.matrix()ᵀ``, ``perm``, ``d``.

    With ``M_u = u.matrix()`` and ``M_v = v.matrix()``: ``U·W·Vᵀ = M_uᵀ · W · M_v``.

    Example:
        >>> inc = make_incoherence(6, 10, IncoherenceConfig(seed=1, rescale=False))
        >>> w = torch.randn(6, 10, dtype=torch.float64)
        >>> bool(torch.allclose(inc.inverse_weight(inc.forward_weight(w)), w))
        True
    """

    #: ComfyUI cannot rotate a layer's outputs: a two-sided basis is never stored as a native layer.
    native = False

    u: KroneckerOrthogonal  # output side, size N
    v: KroneckerOrthogonal  # input side, size K
    perm: torch.Tensor | None = attrs.field(default=None, repr=_t)  # int64 [K]
    d: torch.Tensor | None = attrs.field(default=None, repr=_t)  # float64 [K], > 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.n, self.v.n

    def _check(self, w: torch.Tensor) -> None:
        if tuple(w.shape) != self.shape:
            raise CqError(f"incoherence transform is for [{self.u.n}, {self.v.n}] weights, got {list(w.shape)}")

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``U · W · Vᵀ`` only (no rescaling, no permutation)."""
        a = self.v.apply(w.contiguous())  # W · M_v
        return self.u.apply(a.t().contiguous()).t()  # M_uᵀ · A = (Aᵀ · M_u)ᵀ

    def unrotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``Uᵀ · W · V`` only (the inverse of :meth:`rotate_weight`)."""
        a = self.v.apply_t(w.contiguous())  # W · M_vᵀ
        return self.u.apply_t(a.t().contiguous()).t()  # M_u · A

    def forward_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W' = (U · W·diag(d) · Vᵀ)[:, π]`` in ``w``'s dtype (float32 for low-precision input)."""
        self._check(w)
        x = w if w.dtype in (torch.float32, torch.float64) else w.to(torch.float32)
        if self.d is not None:
            x = x * self.d.to(x.dtype)
        x = self.rotate_weight(x)
        if self.perm is not None:
            x = x[:, self.perm]
        return x.contiguous()

    def inverse_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The exact inverse of :meth:`forward_weight`."""
        self._check(w)
        x = w if w.dtype in (torch.float32, torch.float64) else w.to(torch.float32)
        if self.perm is not None:
            x = x[:, torch.argsort(self.perm)]
        x = self.unrotate_weight(x)
        if self.d is not None:
            x = x / self.d.to(x.dtype)
        return x.contiguous()

    def forward_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """``H' = (V · diag(1/d) H diag(1/d) · Vᵀ)[π][:, π]`` in ``h``'s dtype (float64 math up to K = 4096)."""
        x = h.to(hessian_dtype(h.shape[-1]))
        if self.d is not None:
            inv = (1.0 / self.d).to(x.dtype)
            x = x * inv.reshape(1, -1) * inv.reshape(-1, 1)
        x = self.v.apply(self.v.apply(x).t()).t()  # M_vᵀ · H · M_v
        x = (x + x.t()) * 0.5
        if self.perm is not None:
            x = x[self.perm][:, self.perm]
        return x.to(h.dtype).contiguous()

    # -- cq.state.Basis --------------------------------------------------------------------
    def to_working(self, w: torch.Tensor) -> torch.Tensor:
        return self.forward_weight(w)

    def to_original(self, w: torch.Tensor) -> torch.Tensor:
        return self.inverse_weight(w)

    def hessian_to_working(self, h: torch.Tensor) -> torch.Tensor:
        return self.forward_hessian(h)

    def hessian_to_original(self, h: torch.Tensor) -> torch.Tensor:
        return self.inverse_hessian(h)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        raise CqError("a two-sided QuIP basis has no runtime activation path (its output side is rotated "
                      "too); ComfyUI cannot run it natively")

    def comfy_fields(self) -> Mapping[str, Any]:
        return {}

    def inverse_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """The exact inverse of :meth:`forward_hessian`."""
        x = h.to(hessian_dtype(h.shape[-1]))
        if self.perm is not None:
            inv_p = torch.argsort(self.perm)
            x = x[inv_p][:, inv_p]
        x = self.v.apply_t(self.v.apply_t(x).t()).t()  # M_v · H' · M_vᵀ
        x = (x + x.t()) * 0.5
        if self.d is not None:
            d = self.d.to(x.dtype)
            x = x * d.reshape(1, -1) * d.reshape(-1, 1)
        return x.to(h.dtype).contiguous()


def rescale_factors(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """QuIP's diagonal rescaling ``d_j = clamp((max(H_jj, 1e-12) / max(‖W_:j‖², 1e-12))^¼, 0.1, 10)``.

    Scaling column ``j`` of W by ``d_j`` (and H by ``1/d``) balances each column's weight energy
    against its input energy before the rotation mixes them. float64 ``[K]``.

    Example:
        >>> rescale_factors(torch.tensor([[1.0, 2.0]]), torch.diag(torch.tensor([16.0, 4.0]))).tolist()
        [2.0, 1.0]
    """
    hd = h.detach().to(torch.float64).diagonal().clamp(min=1e-12)
    wn = (w.detach().to(torch.float64) ** 2).sum(dim=0).clamp(min=1e-12)
    return (hd / wn).pow(0.25).clamp(*RESCALE_CLAMP)


def make_incoherence(n: int, k: int, cfg: IncoherenceConfig = IncoherenceConfig(), *,
                     d: torch.Tensor | None = None) -> Incoherence:
    """Build the transform for an ``[n, k]`` weight from ``cfg`` (``d``: optional rescaling factors)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    u = orthogonal_transform(n, use_hadamard=cfg.use_hadamard, generator=gen)
    v = orthogonal_transform(k, use_hadamard=cfg.use_hadamard, generator=gen)
    perm = torch.randperm(k, generator=gen) if cfg.permute else None
    return Incoherence(u=u, v=v, perm=perm, d=d)


def incoherence(state: LayerState, *, cfg: IncoherenceConfig = IncoherenceConfig()) -> LayerState:
    """Rotate weight and Hessian into a seeded incoherent basis (``state.basis`` holds the map).

    ``original`` keeps the original-basis weight; the Hessian (``None`` stays ``None``: ``V I Vᵀ = I``)
    is transformed consistently so that ``tr(W H Wᵀ)`` is unchanged. Put it before the scale and
    rounding stages; map results back with :func:`~cq.transforms.rounding.reconstruct` / :func:`undo_incoherence`.

    Example:
        >>> w = torch.randn(8, 12)
        >>> s = incoherence(LayerState.from_weight("fc", w), cfg=IncoherenceConfig(seed=3))
        >>> bool(torch.allclose(reconstruct(s), w, atol=1e-5)), s.notes
        (True, ('incoherence: no Hessian, diagonal rescaling skipped',))
    """
    if state.codes is not None:
        raise CqError(f"{state.name}: incoherence must come before quantization (the state already has codes)")
    if state.basis is not None:
        raise CqError(f"{state.name}: the layer is already rotated ({state.basis!r}); apply one rotation only")
    n, k = state.shape
    note = None
    d = None
    if cfg.rescale:
        if state.hessian is None:
            note = "incoherence: no Hessian, diagonal rescaling skipped"
        else:
            d = rescale_factors(state.weight, state.hessian)
    inc = make_incoherence(n, k, cfg, d=d)
    w = inc.forward_weight(state.weight)
    h = None if state.hessian is None else inc.forward_hessian(state.hessian)
    original = state.original if state.original is not None else state.weight
    return record(state, "incoherence", cfg, note=note, basis=inc, weight=w, hessian=h, original=original)


def undo_incoherence(state: LayerState) -> LayerState:
    """Map the state back to the original basis; codes (if any) become the dequantized weight.

    ``weight`` becomes :func:`~cq.transforms.rounding.reconstruct` (the QuIP reconstruction ``Ŵ``), ``hessian``
    is mapped back exactly, and codes, scale, granularity and format are dropped (they do not exist
    in the original basis): re-quantize with ``absmax_scale`` and ``round_to_nearest``.
    """
    if not isinstance(state.basis, Incoherence):
        raise CqError(f"{state.name}: undo_incoherence needs a state from the incoherence stage "
                      f"(its basis is {state.basis!r})")
    w = reconstruct(state)
    h = None if state.hessian is None else state.basis.inverse_hessian(state.hessian)
    return record(state, "undo_incoherence", None, weight=w, hessian=h, codes=None, scale=None, granularity=None,
                  format=None, basis=None)
