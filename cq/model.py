"""Model-level steps: a lazy, read-only view of every tensor of a model, and joint edits of several.

A per-layer pipeline sees one :class:`~cq.state.LayerState`. Some steps need the whole model: LoRA
merging (a LoRA key addresses one or a slice of a base weight), smoothing folds (a factor moves from
one Linear's output rows into the next Linear's input columns), bias correction (calibration means).
Such a step is a **model transform**: a pure function ``ModelView -> ModelEdits``. It reads what it
needs lazily through the view (the model is never loaded at once) and returns, for each tensor it
changes, the stages to run on that tensor before its recipe. The runner applies those stages to the
float32 tensor, in the original basis, whether the tensor is then quantized or kept.

Example:
    >>> import torch
    >>> from cq.pipeline import stage
    >>> from cq.state import record
    >>> view = DictView({"fc.weight": torch.ones(2, 2)})
    >>> def double(state):
    ...     return record(state, "double", weight=state.weight * 2, original=state.original * 2)
    >>> def doubler(view):
    ...     return ModelEdits(stages={k: (stage(double),) for k in view.keys()})
    >>> edits = run_model_transforms(view, [doubler])
    >>> edits.apply("fc.weight", view.tensor("fc.weight")).tolist()
    [[2.0, 2.0], [2.0, 2.0]]
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import attrs
import torch

from .errors import ConfigError
from .pipeline import Pipeline, Stage, stage as _stage
from .state import LayerState

__all__ = ["ModelView", "LoaderView", "DictView", "ModelEdits", "ModelTransform", "run_model_transforms"]


@runtime_checkable
class ModelView(Protocol):
    """Read-only access to a model's tensors by name; ``tensor`` reads one tensor on demand."""

    def keys(self) -> list[str]:
        """Tensor names in file order."""

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape from the header, without reading data."""

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype, without reading data."""

    def tensor(self, key: str) -> torch.Tensor:
        """A fresh tensor with ``key``'s stored values (the caller owns it)."""

    def metadata(self) -> Mapping[str, str]:
        """The file's ``__metadata__``."""


class LoaderView:
    """A :class:`ModelView` over an open :class:`~cq.io.UnifiedSafetensorsLoader`."""

    def __init__(self, loader):
        self.loader = loader
        self.path = getattr(loader, "path", None)

    def keys(self) -> list[str]:
        return list(self.loader.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.loader

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.loader.get_shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return self.loader.get_dtype(key)

    def tensor(self, key: str) -> torch.Tensor:
        return self.loader.get_tensor(key)

    def metadata(self) -> Mapping[str, str]:
        return types.MappingProxyType(self.loader.metadata())


class DictView:
    """A :class:`ModelView` over an in-memory mapping of tensors (tests, Python users).

    Example:
        >>> v = DictView({"a.weight": torch.zeros(3, 2)})
        >>> v.keys(), v.shape("a.weight")
        (['a.weight'], (3, 2))
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
        self._tensors = dict(tensors)
        self._metadata = dict(metadata or {})
        self.path = None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def _get(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a tensor of this model ({len(self._tensors)} tensors)") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._get(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._get(key).dtype

    def tensor(self, key: str) -> torch.Tensor:
        return self._get(key).clone()

    def metadata(self) -> Mapping[str, str]:
        return types.MappingProxyType(self._metadata)


def _frozen_stages(value: Mapping[str, Iterable[Stage | Callable]] | None) -> Mapping[str, tuple[Stage, ...]]:
    out = {}
    for key, stages in dict(value or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"ModelEdits keys must be tensor names (str), got {key!r}")
        out[key] = tuple(s if isinstance(s, Stage) else _stage(s) for s in stages)
    return types.MappingProxyType(out)


def _unique_names(stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """Two transforms may both add e.g. a ``merge_lora`` stage to one tensor: number the repeats."""
    seen: dict[str, int] = {}
    out = []
    for s in stages:
        n = seen.get(s.name, 0)
        seen[s.name] = n + 1
        out.append(s if n == 0 else attrs.evolve(s, name=f"{s.name}#{n + 1}"))
    return tuple(out)


@attrs.frozen
class ModelEdits:
    """What model transforms change: per tensor, stages to run before its recipe; notes; a report.

    ``stages[key]`` run on ``LayerState.from_weight(key, tensor.float())`` (any shape: a bias edit
    sees a 1-D weight). ``warnings`` are printed as ``warning:`` lines by the runner and kept in the
    report; ``report`` holds structured facts (e.g. ``{"lora": {...}}``) copied into the conversion
    report as they are.
    """

    stages: Mapping[str, tuple[Stage, ...]] = attrs.field(factory=dict, converter=_frozen_stages)
    warnings: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    report: Mapping[str, Any] = attrs.field(factory=dict, converter=lambda d: types.MappingProxyType(dict(d)))

    def __or__(self, other: "ModelEdits") -> "ModelEdits":
        """Compose: ``self``'s stages run first on a tensor both edit."""
        stages = {k: tuple(v) for k, v in self.stages.items()}
        for k, v in other.stages.items():
            stages[k] = _unique_names(stages.get(k, ()) + tuple(v))
        return ModelEdits(stages=stages, warnings=self.warnings + other.warnings,
                          report={**self.report, **other.report})

    def __contains__(self, key: object) -> bool:
        return key in self.stages

    def pipeline(self, key: str) -> Pipeline:
        """The edit stages of ``key`` as a pipeline (the identity when it has none)."""
        return Pipeline(self.stages.get(key, ()))

    def apply_state(self, state: LayerState, key: str) -> LayerState:
        """Run ``key``'s stages on ``state`` (the identity when ``key`` is not edited)."""
        return self.pipeline(key)(state) if key in self.stages else state

    def apply(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Edit one tensor; returns float32 (float64 stays float64) when edited, ``tensor`` otherwise."""
        if key not in self.stages:
            return tensor
        dt = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        return self.apply_state(LayerState.from_weight(key, tensor.to(dt)), key).weight


#: A model transform: a pure function of the model view (bind its config with ``functools.partial``).
ModelTransform = Callable[[ModelView], ModelEdits]


def run_model_transforms(view: ModelView, transforms: Iterable[ModelTransform]) -> ModelEdits:
    """Run each transform on ``view`` and compose their edits in order."""
    edits = ModelEdits()
    for t in transforms:
        out = t(view)
        if not isinstance(out, ModelEdits):
            raise ConfigError(f"model transform {getattr(t, '__name__', t)!r} returned {type(out).__name__}; "
                              "a model transform must return cq.model.ModelEdits")
        edits = edits | out
    return edits


def iter_keys(view: ModelView) -> Iterator[str]:
    return iter(view.keys())
