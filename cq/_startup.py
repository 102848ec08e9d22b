"""When cq runs as the ``cq`` command, a Ctrl-C during start-up prints one line, not a traceback.

Importing cq imports torch, about two seconds during which :func:`cq.cli.main` is not running yet,
so its own ``KeyboardInterrupt`` handler cannot help. This module is imported first by
``cq/__init__.py`` and imports nothing heavy. Only when the interpreter was started as the command
(``cq ...`` or ``python -m cq ...``, read from :data:`sys.orig_argv`) does it replace
:data:`sys.excepthook`, and then only for ``KeyboardInterrupt``: the interpreter still exits with
the SIGINT status, every other exception is printed as before, and a library user's ``import cq``
is untouched.

A Ctrl-C must also not land *inside* torch's C++ initialisation: a ``KeyboardInterrupt`` raised
through pybind11 there aborts the process ("terminate called after throwing ..."), which a cold
start (no compiled ``.pyc`` yet) made likely. So, as the command, SIGINT is only recorded while the
package imports; :func:`release` (the last line of ``cq/__init__.py``) restores the handler and
raises the recorded interrupt from plain Python.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["started_as_cli", "release"]

INTERRUPTED = "cq: interrupted; no output was written"


def started_as_cli(argv: list[str] | None = None) -> bool:
    """Whether this interpreter was started as the ``cq`` command.

    Example:
        >>> started_as_cli(["python", "-m", "cq", "-i", "m.safetensors"]), started_as_cli(["/venv/bin/cq"])
        (True, False)
        >>> started_as_cli(["/venv/bin/python", "/venv/bin/cq", "-i", "m"]), started_as_cli(["python", "-m", "pytest"])
        (True, False)
    """
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] == "cq":
        return True
    return len(argv) >= 2 and os.path.basename(argv[1]) in ("cq", "cq.exe", "cq-script.py")


def _hook(exc_type, exc, tb, _previous=sys.excepthook):
    if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
        print(INTERRUPTED, file=sys.stderr)
        return
    _previous(exc_type, exc, tb)


_interrupted = False
_held: list = []  # the SIGINT handler to restore, while the package imports


def _record(signum, frame):
    global _interrupted
    _interrupted = True


def release() -> None:
    """End of the package import: restore SIGINT, and raise a Ctrl-C that came while importing.

    Example:
        >>> release()  # nothing held outside the command: a no-op
    """
    global _interrupted
    while _held:
        signal.signal(signal.SIGINT, _held.pop())
    if _interrupted:
        _interrupted = False
        raise KeyboardInterrupt


if started_as_cli():
    sys.excepthook = _hook
    try:
        _held.append(signal.signal(signal.SIGINT, _record))
    except ValueError:  # not the main thread: nothing to hold
        pass
