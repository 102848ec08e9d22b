"""The immutable per-layer record that every cq transform reads and returns.

Notation: a Linear weight is ``[N, K]`` = ``[out_features, in_features]`` (the ``nn.Linear.weight``
orientation); a Hessian is ``[K, K]`` = ``2/T · XᵀX`` over ``T`` input rows ``X`` of shape ``[T, K]``.
"""

from __future__ import annotations

import types
from typing import Any, Mapping, Protocol, runtime_checkable

import attrs
import torch

__all__ = [
    "Granularity",
    "PerTensor",
    "PerRow",
    "PerBlock",
    "PerGroup",
    "InputRotation",
    "LayerState",
    "record",
]


# ---------------------------------------------------------------------------------------------
# Scale granularities: small value types, each documenting the scale shape it produces.


@attrs.frozen
class PerTensor:
    """One scale for the whole weight; scale shape ``()`` (ComfyUI ``int8_tensorwise``)."""

    def scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        return ()


@attrs.frozen
class PerRow:
    """One scale per output row; scale shape ``[N, 1]`` (ComfyUI ``int8_tensorwise``, per row)."""

    def scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        return (n, 1)


def _positive(instance, attribute, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        from .errors import ConfigError

        raise ConfigError(f"{attribute.name}={value!r} must be a positive int, e.g. 128")


@attrs.frozen
class PerBlock:
    """2-D tiles of ``size × size``; scale shape ``[N/size, K/size]`` (the fork's ``int8_blockwise``).

    Vanilla ComfyUI cannot load this layout; it exists for the fork's custom nodes only.
    """

    size: int = attrs.field(validator=_positive)

    def scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        return (n // self.size, k // self.size)


@attrs.frozen
class PerGroup:
    """Row groups of ``1 × size`` along K; scale shape ``[N, K/size, 1]`` (the fork's QuIP "block").

    Vanilla ComfyUI cannot load this layout either.
    """

    size: int = attrs.field(validator=_positive)

    def scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        return (n, k // self.size, 1)


Granularity = PerTensor | PerRow | PerBlock | PerGroup


# ---------------------------------------------------------------------------------------------
# Input rotations: a stored weight ``W' = W · R`` with orthogonal ``R`` is used at runtime as
# ``y = (x · R) · W'ᵀ``; ``unrotate_weight`` maps ``W'`` back to the original basis (``W' · Rᵀ``).


@runtime_checkable
class InputRotation(Protocol):
    """An orthogonal rotation ``R`` of the input dimension, applied to weights and activations."""

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x · R`` for ``x`` of shape ``[..., K]``."""

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x · Rᵀ`` for ``x`` of shape ``[..., K]``."""

    def comfy_fields(self) -> Mapping[str, Any]:
        """Entries this rotation adds to the layer's ``.comfy_quant`` JSON (empty if not native)."""


# ---------------------------------------------------------------------------------------------


def _freeze_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value or {}))


def _check_weight(instance, attribute, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{instance.name}: weight must be a torch.Tensor, got {type(value).__name__}")


@attrs.frozen(kw_only=True, eq=False)
class LayerState:
    """Everything known about one layer at one point of a pipeline.

    Transforms never mutate a state or its tensors; they return ``attrs.evolve``-d copies (see
    :func:`record`). Equality is by identity (tensors have no boolean ``==``).

    Example:
        >>> import torch
        >>> s = LayerState.from_weight("blk.0.fc", torch.ones(2, 3))
        >>> s.shape, s.codes is None, s.history
        ((2, 3), True, ())
    """

    name: str
    weight: torch.Tensor = attrs.field(validator=_check_weight)  # float [N, K], working basis
    original: torch.Tensor | None = None  # float [N, K], original basis (what metrics compare to)
    bias: torch.Tensor | None = None  # float [N]
    hessian: torch.Tensor | None = None  # float [K, K] in the working basis, H = 2/T XᵀX
    codes: torch.Tensor | None = None  # int8 [N, K] in the working basis
    scale: torch.Tensor | None = None  # float32, shape given by `granularity`
    granularity: Granularity | None = None
    rotation: InputRotation | None = None  # working basis = original basis · R
    format: str | None = None  # output label, e.g. "int8_tensorwise" or "fp16"
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_mapping)
    history: tuple[tuple[str, Any], ...] = ()  # (stage name, config) in the order applied

    @classmethod
    def from_weight(
        cls,
        name: str,
        weight: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> "LayerState":
        """Start a pipeline from a float weight; ``original`` is set to the same tensor."""
        return cls(name=name, weight=weight, original=weight, bias=bias, hessian=hessian, meta=meta)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def notes(self) -> tuple[str, ...]:
        """Human-readable notes transforms left for the report (fallbacks, damping increases)."""
        return tuple(self.meta.get("notes", ()))

    def stage_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.history)

    def __repr__(self) -> str:
        def t(x):
            return None if x is None else f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"

        return (f"LayerState(name={self.name!r}, weight={t(self.weight)}, codes={t(self.codes)}, "
                f"scale={t(self.scale)}, granularity={self.granularity!r}, format={self.format!r}, "
                f"hessian={t(self.hessian)}, stages={list(self.stage_names())})")


def record(state: LayerState, stage: str, config: Any = None, *, note: str | None = None,
           meta: Mapping[str, Any] | None = None, **changes: Any) -> LayerState:
    """Return ``state`` evolved with ``changes``, ``(stage, config)`` appended to its history.

    ``meta`` entries are merged into the existing metadata; ``note`` is appended to ``meta["notes"]``.

    Example:
        >>> import torch
        >>> s = LayerState.from_weight("fc", torch.ones(1, 1))
        >>> record(s, "noop", note="nothing to do").notes
        ('nothing to do',)
    """
    new_meta = dict(state.meta)
    if meta:
        new_meta.update(meta)
    if note:
        new_meta["notes"] = tuple(new_meta.get("notes", ())) + (note,)
    return attrs.evolve(state, meta=new_meta, history=state.history + ((stage, config),), **changes)
