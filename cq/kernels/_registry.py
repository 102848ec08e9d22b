"""Kernel registry: one op, several implementations, chosen at call time with reasons on failure."""

from __future__ import annotations

import enum
from typing import Callable, Sequence

import attrs
import torch

from ..errors import ConfigError, UnsupportedBackendError

__all__ = ["Backend", "KernelImpl", "register", "implementations", "select", "not_supported_reasons"]


class Backend(str, enum.Enum):
    """Which implementation of a kernel op to run.

    ``AUTO`` walks the registered implementations by priority and takes the first that can run the
    given tensors, falling back to the pure-torch reference. Any other value is an explicit request:
    if that implementation cannot run, :class:`~cq.errors.UnsupportedBackendError` lists why.
    """

    AUTO = "auto"
    #: Pure-torch implementation; the CPU path and the oracle of every parity test.
    TORCH = "torch"
    #: Triton kernels (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``).
    TRITON = "triton"
    #: numba CPU kernels (``quantize_rows``); needs the optional ``numba`` package.
    NUMBA = "numba"


def _name_ok(instance, attribute, value):
    if not value or not isinstance(value, str):
        raise ConfigError(f"kernel {attribute.name} must be a non-empty str, got {value!r}")


@attrs.frozen
class KernelImpl:
    """One implementation of one op, with the capabilities it declares.

    ``available`` returns a reason string when the implementation cannot run at all on this
    machine (library missing, no device), or ``None`` when it can.
    ``check`` returns reasons specific to the given tensors (device, dtype, shape limits).
    """

    op: str = attrs.field(validator=_name_ok)
    name: str = attrs.field(validator=_name_ok)
    fn: Callable
    devices: tuple[str, ...] = ("cpu", "cuda")
    priority: int = 0
    available: Callable[[], str | None] = lambda: None
    check: Callable[..., list[str]] = lambda *tensors: []


_REGISTRY: dict[str, list[KernelImpl]] = {}


def register(impl: KernelImpl) -> KernelImpl:
    """Add ``impl`` to the registry (replacing an earlier one of the same op and name)."""
    impls = [i for i in _REGISTRY.get(impl.op, []) if i.name != impl.name]
    impls.append(impl)
    impls.sort(key=lambda i: -i.priority)
    _REGISTRY[impl.op] = impls
    return impl


def implementations(op: str) -> tuple[KernelImpl, ...]:
    if op not in _REGISTRY:
        raise ConfigError(f"unknown kernel op {op!r}; registered ops are {sorted(_REGISTRY)}")
    return tuple(_REGISTRY[op])


def not_supported_reasons(impl: KernelImpl, *tensors: torch.Tensor) -> list[str]:
    """Every reason ``impl`` cannot run on ``tensors`` (empty when it can)."""
    why = impl.available()
    if why:
        return [why]
    reasons = []
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    bad = sorted(devices - set(impl.devices))
    if bad:
        reasons.append(f"tensors on {bad}, supports {list(impl.devices)}")
    reasons.extend(impl.check(*tensors))
    return reasons


def select(op: str, backend: Backend | str, tensors: Sequence[torch.Tensor]) -> KernelImpl:
    """Pick the implementation of ``op`` to run on ``tensors`` for the requested ``backend``."""
    try:
        backend = Backend(backend)
    except ValueError:
        raise ConfigError(
            f"backend={backend!r} is not one of {[b.value for b in Backend]}; use 'auto' to let cq choose"
        ) from None
    impls = implementations(op)
    reasons: dict[str, list[str]] = {}
    if backend is Backend.AUTO:
        for impl in impls:
            why = not_supported_reasons(impl, *tensors)
            if not why:
                return impl
            reasons[impl.name] = why
        raise UnsupportedBackendError(op, reasons)
    for impl in impls:
        if impl.name == backend.value:
            why = not_supported_reasons(impl, *tensors)
            if why:
                raise UnsupportedBackendError(op, {impl.name: why})
            return impl
    raise UnsupportedBackendError(
        op, {backend.value: [f"no {backend.value!r} implementation of {op!r}; registered: {[i.name for i in impls]}"]}
    )
