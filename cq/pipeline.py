"""Named, inspectable pipelines of ``LayerState -> LayerState`` stages, composed with toolz."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import attrs
import toolz

from .errors import ConfigError
from .state import LayerState

__all__ = ["Stage", "Pipeline", "stage", "pipeline", "tap"]

Transform = Callable[[LayerState], LayerState]


@attrs.frozen
class Stage:
    """A transform bound to its configuration, with a readable name.

    Example:
        >>> from cq.transforms import absmax_scale, ScaleConfig
        >>> Stage("scale", absmax_scale, ScaleConfig()).name
        'scale'
    """

    name: str
    fn: Callable[..., LayerState]
    cfg: Any = None

    def __call__(self, state: LayerState) -> LayerState:
        if self.cfg is None:
            return self.fn(state)
        return self.fn(state, cfg=self.cfg)

    def __repr__(self) -> str:
        return f"{self.name}({self.cfg!r})" if self.cfg is not None else self.name


def stage(fn: Callable[..., LayerState], cfg: Any = None, *, name: str | None = None) -> Stage:
    """Bind ``fn`` to ``cfg`` as a :class:`Stage` named after the function unless ``name`` is given."""
    return Stage(name or getattr(fn, "__name__", "stage"), fn, cfg)


def _as_stage(item: Stage | Transform) -> Stage:
    if isinstance(item, Stage):
        return item
    if callable(item):
        return Stage(getattr(item, "__name__", repr(item)), item)
    raise ConfigError(f"pipeline stages must be Stage objects or callables, got {type(item).__name__}")


@attrs.frozen
class Pipeline:
    """An ordered tuple of uniquely named stages; calling it runs them left to right.

    Pipelines are values: :meth:`then`, :meth:`replace`, :meth:`insert_before` and :meth:`without`
    return new pipelines and leave this one unchanged.

    Example:
        >>> from cq.transforms import absmax_scale, round_to_nearest, ScaleConfig
        >>> p = pipeline(stage(absmax_scale, ScaleConfig()), round_to_nearest)
        >>> p.names
        ('absmax_scale', 'round_to_nearest')
    """

    stages: tuple[Stage, ...] = attrs.field(converter=lambda s: tuple(_as_stage(x) for x in s))

    @stages.validator
    def _unique(self, attribute, value):
        names = [s.name for s in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(
                f"pipeline stages must have unique names, but got {names}; "
                f"rename the duplicates {dupes} with stage(fn, cfg, name=...)"
            )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def __call__(self, state: LayerState) -> LayerState:
        return toolz.pipe(state, *self.stages)

    def __getitem__(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}; stages are {list(self.names)}")

    def then(self, *items: Stage | Transform) -> "Pipeline":
        return Pipeline(self.stages + tuple(_as_stage(i) for i in items))

    def _index(self, name: str) -> int:
        self[name]  # raises a KeyError listing the stages
        return self.names.index(name)

    def replace(self, name: str, item: Stage | Transform) -> "Pipeline":
        i = self._index(name)
        return Pipeline(self.stages[:i] + (_as_stage(item),) + self.stages[i + 1:])

    def insert_before(self, name: str, *items: Stage | Transform) -> "Pipeline":
        i = self._index(name)
        return Pipeline(self.stages[:i] + tuple(_as_stage(x) for x in items) + self.stages[i:])

    def without(self, name: str) -> "Pipeline":
        i = self._index(name)
        return Pipeline(self.stages[:i] + self.stages[i + 1:])

    def __repr__(self) -> str:
        return "Pipeline(" + " -> ".join(repr(s) for s in self.stages) + ")"


def pipeline(*items: Stage | Transform) -> Pipeline:
    """Compose stages left to right into a :class:`Pipeline` (``pipeline()`` is the identity)."""
    return Pipeline(items)


def tap(fn: Callable[[LayerState], Any], *, name: str | None = None) -> Stage:
    """A side-effect stage (logging, progress): runs ``fn(state)`` and returns ``state`` unchanged."""

    def _tap(state: LayerState) -> LayerState:
        fn(state)
        return state

    return Stage(name or f"tap[{getattr(fn, '__name__', 'fn')}]", _tap)


def run_all(pipe: Pipeline, states: Iterable[LayerState]) -> Iterable[LayerState]:
    """Lazily apply ``pipe`` to each state (a generator: one layer in memory at a time)."""
    return map(pipe, states)

