"""Exception types raised by cq; every message says what was received, what is allowed, and how to fix it."""

from __future__ import annotations


class CqError(Exception):
    """Base class of every error cq raises on purpose."""


class ConfigError(CqError, ValueError):
    """A configuration value is invalid (bad regex, unknown mode, out-of-range number)."""


class InputError(CqError):
    """An input file or tensor cannot be used (missing, corrupt, truncated, wrong kind)."""


class NonFiniteWeightError(InputError):
    """A weight that would be quantized holds NaN or Inf values."""


class UnsupportedBackendError(CqError, RuntimeError):
    """No kernel backend can run an op; the message lists every candidate and why it was rejected."""

    def __init__(self, op: str, reasons: dict[str, list[str]]):
        self.op = op
        self.reasons = reasons
        lines = [f"no backend can run {op!r}:"]
        for name, why in reasons.items():
            lines.append(f"  {name}: {'; '.join(why) if why else 'not selected'}")
        super().__init__("\n".join(lines))
