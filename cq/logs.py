"""Logging for cq: four verbosity levels on the ``"cq"`` logger, never the root logger.

Levels (the reference's names): ``DEBUG`` = 10, ``VERBOSE`` = 15, ``NORMAL`` = 20 (``INFO``),
``MINIMAL`` = 30 (``WARNING``). :func:`setup_logging` installs one handler on ``"cq"`` and stops
propagation to the root logger, so messages never print twice (the reference printed them
twice once something configured the root logger). Calling it again only changes the level.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from .errors import ConfigError

__all__ = ["DEBUG", "VERBOSE", "NORMAL", "MINIMAL", "LEVELS", "setup_logging", "reset_logging", "get_logger",
           "ROOT_LOGGER"]

DEBUG = logging.DEBUG
VERBOSE = 15
NORMAL = logging.INFO
MINIMAL = logging.WARNING
LEVELS = {"DEBUG": DEBUG, "VERBOSE": VERBOSE, "NORMAL": NORMAL, "MINIMAL": MINIMAL,
          "INFO": NORMAL, "WARNING": MINIMAL, "ERROR": logging.ERROR}
ROOT_LOGGER = "cq"


class _CqHandler(logging.StreamHandler):
    """Writes to the stream given, or to whatever ``sys.stderr`` is at emit time (pytest swaps it)."""

    #: How :func:`setup_logging` recognises its own handlers, even those of another copy of this
    #: module (a doctest import of ``cq/logs.py`` is a second module object with its own class).
    cq_handler = True

    def __init__(self, stream: TextIO | None):
        super().__init__(stream)
        self._fixed = stream

    @property
    def stream(self):  # type: ignore[override]
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value):
        pass  # StreamHandler.__init__ assigns it; the property above decides


def _level(level: str | int) -> int:
    if isinstance(level, bool):
        raise ConfigError(f"log level must be a name or an int, got {level!r}")
    if isinstance(level, int):
        return level
    if isinstance(level, str) and level.upper() in LEVELS:
        return LEVELS[level.upper()]
    raise ConfigError(f"unknown log level {level!r}; use one of DEBUG, VERBOSE, NORMAL, MINIMAL")


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``"cq"`` logger, or its child ``"cq.<name>"`` (``name`` may already start with ``cq``).

    Example:
        >>> get_logger("io").name, get_logger("cq.io").name, get_logger().name
        ('cq.io', 'cq.io', 'cq')
    """
    if not name or name == ROOT_LOGGER:
        return logging.getLogger(ROOT_LOGGER)
    if name.startswith(ROOT_LOGGER + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{ROOT_LOGGER}.{name}")


def setup_logging(level: str | int = "NORMAL", *, stream: TextIO | None = None,
                  fmt: str = "%(message)s") -> logging.Logger:
    """Send cq's messages at ``level`` and above to ``stream`` (default: standard error).

    Idempotent: one handler at most, whatever the number of calls. Returns the ``"cq"`` logger.

    Example:
        >>> import io
        >>> buf = io.StringIO()
        >>> log = setup_logging("VERBOSE", stream=buf)
        >>> log.log(VERBOSE, "detail"); log.debug("hidden")
        >>> _ = setup_logging("VERBOSE", stream=buf)
        >>> buf.getvalue(), sum(getattr(h, "cq_handler", False) for h in log.handlers)
        ('detail\\n', 1)
        >>> reset_logging()
    """
    logger = logging.getLogger(ROOT_LOGGER)
    lvl = _level(level)
    for h in [h for h in logger.handlers if getattr(h, "cq_handler", False)]:
        logger.removeHandler(h)
        h.close()
    handler = _CqHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(lvl)
    logger.propagate = False
    return logger


def reset_logging() -> None:
    """Undo :func:`setup_logging`: remove its handler, reset the level, propagate to the root again."""
    logger = logging.getLogger(ROOT_LOGGER)
    for h in [h for h in logger.handlers if getattr(h, "cq_handler", False)]:
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
