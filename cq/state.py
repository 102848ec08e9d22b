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
    "Basis",
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
# The working basis: a layer may be quantized in a rotated basis ``W' = B(W)``. One protocol covers
# both kinds cq uses: ConvRot (one-sided ``W·R``, which ComfyUI applies to activations at runtime, so
# the file stores the rotated codes natively) and QuIP's two-sided incoherence ``U·W·Vᵀ`` (no runtime
# support: the layer is mapped back, or stored with its extra tensors for a custom loader).


@runtime_checkable
class Basis(Protocol):
    """A change of basis of one layer's weight, with its exact inverse.

    ``native``: ComfyUI's runtime applies this basis to the activations (``activations``) when the
    layer's ``.comfy_quant`` carries ``comfy_fields()``; only then can the rotated codes be stored as
    an ordinary ComfyUI layer.
    """

    native: bool

    def to_working(self, w: torch.Tensor) -> torch.Tensor:
        """Original-basis weight ``[N, K]`` (or any ``[..., K]`` delta) → working basis."""

    def to_original(self, w: torch.Tensor) -> torch.Tensor:
        """Working-basis weight → original basis (exact inverse of :meth:`to_working`)."""

    def hessian_to_working(self, h: torch.Tensor) -> torch.Tensor:
        """``[K, K]`` Hessian of the original basis → working basis (keeps ``tr(W H Wᵀ)``)."""

    def hessian_to_original(self, h: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`hessian_to_working`."""

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """What the runtime does to input rows ``[T, K]`` before the int8 matmul (native bases only)."""

    def comfy_fields(self) -> Mapping[str, Any]:
        """Entries this basis adds to the layer's ``.comfy_quant`` (empty when not native)."""


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
    basis: Basis | None = None  # working weight = basis.to_working(original)
    format: str | None = None  # output label, e.g. "int8_tensorwise" or "fp16"
    metrics: Mapping[str, float] = attrs.field(factory=dict, converter=_freeze_mapping)  # see transforms.metrics
    notes: tuple[str, ...] = attrs.field(default=(), converter=tuple)  # fallbacks and surprises, for the report
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_mapping)  # free-form user data
    history: tuple[tuple[str, Any], ...] = ()  # (stage name, config) in the order applied

    @classmethod
    def from_weight(
        cls,
        name: str,
        weight: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        hessian: torch.Tensor | None = None,
        notes: tuple[str, ...] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> "LayerState":
        """Start a pipeline from a float weight; ``original`` is set to the same tensor."""
        return cls(name=name, weight=weight, original=weight, bias=bias, hessian=hessian, notes=notes, meta=meta)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def to(self, device: torch.device | str) -> "LayerState":
        """The same state with every tensor on ``device`` (the basis and configs stay as they are).

        Example:
            >>> LayerState.from_weight("fc", torch.ones(1, 1)).to("cpu").weight.device.type
            'cpu'
        """
        dev = torch.device(device)
        moved = {f: getattr(self, f).to(dev) for f in ("weight", "original", "bias", "hessian", "codes", "scale")
                 if getattr(self, f) is not None and getattr(self, f).device != dev}
        if "weight" in moved and self.original is self.weight:
            moved["original"] = moved["weight"]
        return attrs.evolve(self, **moved) if moved else self

    def stage_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.history)

    def __repr__(self) -> str:
        def t(x):
            return None if x is None else f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"

        return (f"LayerState(name={self.name!r}, weight={t(self.weight)}, codes={t(self.codes)}, "
                f"scale={t(self.scale)}, granularity={self.granularity!r}, basis={self.basis!r}, format={self.format!r}, "
                f"hessian={t(self.hessian)}, stages={list(self.stage_names())})")


def record(state: LayerState, stage: str, config: Any = None, *, note: str | None = None,
           notes: tuple[str, ...] = (), metrics: Mapping[str, float] | None = None,
           meta: Mapping[str, Any] | None = None, **changes: Any) -> LayerState:
    """Return ``state`` evolved with ``changes``, ``(stage, config)`` appended to its history.

    ``metrics`` and ``meta`` entries are merged into the existing ones; ``note`` / ``notes`` are
    appended to ``state.notes``.

    Example:
        >>> import torch
        >>> s = LayerState.from_weight("fc", torch.ones(1, 1))
        >>> record(s, "noop", note="nothing to do").notes
        ('nothing to do',)
    """
    if meta:
        changes["meta"] = {**state.meta, **meta}
    if metrics:
        changes["metrics"] = {**state.metrics, **metrics}
    added = tuple(notes) + ((note,) if note else ())
    if added:
        changes["notes"] = state.notes + added
    return attrs.evolve(state, history=state.history + ((stage, config),), **changes)
