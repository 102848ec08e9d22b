"""Checks on the files a run writes, made before any work starts.

Two promises rest on these checks: no file cq reads is ever overwritten (through any symlink, hard
link or relative spelling), and no output path fails *after* the conversion (a report path in a
missing folder would otherwise raise once the model has been written). Both are cheap to verify up
front, so :func:`check_outputs` runs before the first tensor is read.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence, Union

from ..errors import ConfigError

__all__ = ["check_outputs", "check_writable", "same_file"]

PathLike = Union[str, os.PathLike]
#: A role's path(s): one path, several (``--merge-loras a b``), or ``None`` when unused.
PathArg = Union[PathLike, Sequence[PathLike], None]


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same real path, or the same inode (hard links).

    Example:
        >>> same_file("x/../m.safetensors", "./m.safetensors"), same_file("a.json", "b.json")
        (True, False)
    """
    a, b = os.fspath(a), os.fspath(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet: only the real-path test applies
        return False


def _paths(value: PathArg) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value if v is not None]


def check_writable(path: PathLike, what: str = "output") -> None:
    """Raise :class:`~cq.errors.ConfigError` unless a file can be written (atomically) at ``path``.

    cq writes through a temporary file in the same folder and a rename, so the folder must exist and
    be writable, and ``path`` must not be a folder.

    Example:
        >>> check_writable("no_such_folder/r.json", "--report-json")
        Traceback (most recent call last):
        ...
        cq.errors.ConfigError: --report-json 'no_such_folder/r.json': the folder 'no_such_folder' does not exist; create it first or choose another path
    """
    p = os.fspath(path)
    if not p:
        raise ConfigError(f"{what}: the path is empty; give a file name")
    if os.path.isdir(p):
        raise ConfigError(f"{what} {p!r} is a folder; give a file name inside it")
    folder = os.path.dirname(os.path.abspath(p))
    shown = os.path.dirname(p) or "."
    if not os.path.exists(folder):
        raise ConfigError(f"{what} {p!r}: the folder {shown!r} does not exist; create it first or choose "
                          "another path")
    if not os.path.isdir(folder):
        raise ConfigError(f"{what} {p!r}: {shown!r} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {p!r}: the folder {shown!r} is not writable; choose a folder you can "
                          "write to")


def check_outputs(reads: Mapping[str, PathArg], writes: Mapping[str, PathArg]) -> None:
    """Refuse a run whose outputs would overwrite one of its inputs or each other, or cannot be written.

    ``reads`` and ``writes`` map a role (how the user named the file, e.g. ``"-i"``,
    ``"--report-json"``) to a path, a list of paths, or ``None`` (role unused). Every write is
    checked with :func:`check_writable`, against every read and against every other write.

    Raises:
        ConfigError: naming both roles and paths, and how to fix it.

    Example:
        >>> check_outputs({"-i": "m.safetensors"}, {"-o": "out/../m.safetensors"})
        Traceback (most recent call last):
        ...
        cq.errors.ConfigError: -o 'out/../m.safetensors' is the same file as -i 'm.safetensors'; cq never writes onto a file it reads or writes twice: choose another path for -o
    """
    read_items = [(role, p) for role, v in reads.items() for p in _paths(v)]
    write_items = [(role, p) for role, v in writes.items() for p in _paths(v)]
    for i, (role, p) in enumerate(write_items):
        for other_role, q in read_items + write_items[:i]:
            if same_file(p, q):
                raise ConfigError(f"{role} {p!r} is the same file as {other_role} {q!r}; cq never writes onto a "
                                  f"file it reads or writes twice: choose another path for {role}")
    for role, p in write_items:
        check_writable(p, role)


def roles(pairs: Iterable[tuple[str, PathArg]]) -> dict[str, PathArg]:
    """A ``{role: path}`` map from pairs, dropping unused roles (a small helper for callers).

    Example:
        >>> roles([("-i", "m.safetensors"), ("--layer-config", None)])
        {'-i': 'm.safetensors'}
    """
    return {role: v for role, v in pairs if _paths(v)}
