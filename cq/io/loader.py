"""Read safetensors files: a strict header parser and a streaming or preloading tensor loader.

The header is parsed here rather than by ``safetensors`` so that every malformed input gives a
one-line :class:`~cq.errors.InputError` naming the file and what is wrong with it. Tensor bytes
are read with plain ``seek``/``readinto`` into buffers the returned tensor owns, so a caller can
never write through a tensor into a cache or into the file.

Layout of a safetensors file: 8 bytes little-endian ``n``, ``n`` bytes of UTF-8 JSON (an object
mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` plus an optional
``"__metadata__"`` map of strings), then the data section; offsets are relative to its start.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from typing import Any, Iterator, Mapping

import attrs
import torch

from ..errors import InputError

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "MAX_HEADER_BYTES",
    "TensorInfo",
    "SafetensorsHeader",
    "read_header",
    "UnifiedSafetensorsLoader",
    "MemoryEfficientSafeOpen",
]

#: safetensors' own limit on the header size (``MAX_HEADER_SIZE`` in the Rust crate).
MAX_HEADER_BYTES = 100_000_000


def _dtype_table() -> dict[str, torch.dtype]:
    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "C64": torch.complex64,
    }
    # Newer dtypes exist only in recent torch builds; add each one the running torch knows.
    for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                       ("F8_E8M0", "float8_e8m0fnu")):
        if hasattr(torch, attr):
            table[name] = getattr(torch, attr)
    return table


#: safetensors dtype name → torch dtype, for every dtype cq reads and writes.
DTYPES: dict[str, torch.dtype] = _dtype_table()
#: torch dtype → safetensors dtype name.
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}


@attrs.frozen
class TensorInfo:
    """One header entry: dtype name, shape and absolute byte range ``[start, end)`` in the file."""

    name: str
    dtype_name: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@attrs.frozen
class SafetensorsHeader:
    """A parsed, checked safetensors header (``tensors`` in header order)."""

    path: str
    header_bytes: int  # the length field: JSON plus padding
    data_start: int  # 8 + header_bytes
    file_size: int
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start

    def gaps(self) -> list[str]:
        """Bytes of the data section that no tensor covers (``safetensors.safe_open`` rejects them)."""
        problems, pos = [], self.data_start
        for info in sorted(self.tensors.values(), key=lambda t: (t.start, t.end)):
            if info.start > pos:
                problems.append(f"{info.start - pos} unused bytes before tensor {info.name!r}")
            pos = max(pos, info.end)
        if pos < self.file_size:
            problems.append(f"{self.file_size - pos} trailing bytes after the last tensor")
        return problems


def _fail(path: str, what: str) -> InputError:
    return InputError(f"{path}: {what}")


def _pickle_kind(prefix: bytes) -> str | None:
    """What PyTorch pickle format the first bytes of a file show, if any.

    ``torch.save`` writes a zip archive (``PK\x03\x04``) since torch 1.6 and a bare pickle
    (protocol opcode ``0x80`` then the protocol number 2..5) before. Only consulted once the bytes
    failed as a safetensors header, since a valid header length can begin with the same bytes.
    """
    if prefix[:4] == b"PK\x03\x04":
        return "a zip archive, torch.save's format"
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return f"a pickle, protocol {prefix[1]}"
    return None


def _not_safetensors(path: str, prefix: bytes, what: str) -> InputError:
    kind = _pickle_kind(prefix)
    if kind is not None:
        return _fail(path, f"this is a PyTorch pickle checkpoint ({kind}); cq reads safetensors only and never "
                           "unpickles (loading a pickle can run arbitrary code). Convert it to .safetensors "
                           "with a tool you trust, or download the model's .safetensors release")
    return _fail(path, what)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path: str, name: str, entry: Any, data_start: int, file_size: int) -> TensorInfo:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise _fail(path, f"{where}: header entry must be an object, got {type(entry).__name__}")
    missing = {"dtype", "shape", "data_offsets"} - entry.keys()
    if missing:
        raise _fail(path, f"{where}: header entry lacks {sorted(missing)}; the file is not valid safetensors")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _fail(path, f"{where}: unknown dtype {dtype_name!r}; cq reads {' '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _fail(path, f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * _ITEMSIZE[dtype_name]
    if end - begin != expected:
        raise _fail(path, f"{where}: {dtype_name}{shape} needs {expected} bytes but data_offsets "
                          f"{offsets} span {end - begin}; the header is corrupt")
    if data_start + end > file_size:
        raise _fail(path, f"{where}: data ends at byte {data_start + end} but the file has only "
                          f"{file_size} bytes; the file is truncated (re-download or re-export it)")
    return TensorInfo(name=name, dtype_name=dtype_name, shape=tuple(shape),
                      start=data_start + begin, end=data_start + end)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check the header of the safetensors file at ``path`` (reads no tensor data).

    Raises:
        InputError: one line naming the file, for a missing file, a directory, a file that is not
            safetensors, a truncated file, an absurd header length, bad JSON, an unknown dtype,
            offsets outside the file or overlapping, or a byte size that disagrees with the shape.

    Example:
        >>> import tempfile, os, torch
        >>> from cq.io import write_safetensors
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "m.safetensors")
        ...     write_safetensors(p, {"w": torch.ones(2, 3)}, metadata={"k": "v"})
        ...     h = read_header(p)
        >>> h.tensors["w"].shape, h.tensors["w"].dtype, dict(h.metadata)
        ((2, 3), torch.float32, {'k': 'v'})
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _fail(path, "no such file; check the path")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not a safetensors file; pass the .safetensors file inside it")
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _not_safetensors(path, prefix, f"not a safetensors file: only {file_size} bytes, too short "
                                                     "for the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > file_size:
                raise _not_safetensors(path, prefix, f"not a safetensors file, or truncated: the header length "
                                                     f"field says {n} bytes but the file has {file_size} bytes "
                                                     f"(limit {MAX_HEADER_BYTES}); re-download or re-export it")
            raw = f.read(n)
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError:
        raise _not_safetensors(path, prefix, "not a safetensors file: the header is not UTF-8 text") from None
    except RecursionError:  # "[[[[…" nested deeper than the interpreter's limit
        raise _fail(path, "not a safetensors file: the header nests too deeply to be a safetensors header") from None
    except ValueError as e:  # json.JSONDecodeError or a duplicate key
        raise _not_safetensors(path, prefix, f"not a safetensors file: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, prefix, "not a safetensors file: the header must be a JSON object, got "
                                             f"{type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # JSON null is what serde writes for "none"
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "__metadata__ must map strings to strings; safetensors rejects anything else")
    data_start = 8 + n
    tensors = {name: _parse_entry(path, name, entry, data_start, file_size) for name, entry in header.items()}
    prev: TensorInfo | None = None
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if prev is not None and info.start < prev.end:
            raise _fail(path, f"tensors {prev.name!r} and {info.name!r} overlap in the data section; "
                              "the header is corrupt")
        if info.nbytes:
            prev = info
    return SafetensorsHeader(path=path, header_bytes=n, data_start=data_start, file_size=file_size,
                             tensors=tensors, metadata=metadata)


def byte_view(t: torch.Tensor) -> memoryview:
    """A zero-copy, writable byte view of the contiguous CPU tensor ``t`` (valid while ``t`` lives)."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def read_tensor(f, info: TensorInfo, path: str = "<file>") -> torch.Tensor:
    """Read one tensor's bytes from the open binary file ``f`` into a new tensor it owns.

    safetensors stores little-endian data, which is the native order of every platform torch
    supports for CPU tensors (x86-64, aarch64), so the bytes are used as they are.
    """
    out = torch.empty(info.nbytes, dtype=torch.uint8)  # uninitialised: readinto fills it
    f.seek(info.start)
    got = f.readinto(byte_view(out)) if info.nbytes else 0
    if got != info.nbytes:
        raise _fail(path, f"tensor {info.name!r}: read {got} of {info.nbytes} bytes; the file was "
                          "truncated while open")
    if info.dtype_name == "BOOL" and info.nbytes and int(out.max()) > 1:
        # torch assumes bool bytes are 0 or 1; any other value makes later ops undefined (a copy
        # may even change it), so such a file is corrupt rather than "true".
        raise _fail(path, f"tensor {info.name!r}: BOOL data holds byte value {int(out.max())}; only 0 and 1 "
                          "are booleans, the file is corrupt")
    return out.view(info.dtype).reshape(info.shape)


class UnifiedSafetensorsLoader:
    """Read tensors from a safetensors file, streaming (``low_memory=True``) or preloaded.

    The API of the reference tool's loader (alias :data:`MemoryEfficientSafeOpen`). Both modes
    return owned tensors: mutating one changes neither the file nor later ``get_tensor`` results.

    * ``low_memory=True``: only the header is read up front; each ``get_tensor`` seeks to and
      reads just that tensor's bytes. Memory is bounded by the largest tensor requested.
    * ``low_memory=False``: every tensor is read at construction; ``get_tensor`` returns a copy of
      the cached one and ``mark_processed(key)`` frees it.

    ``keys()`` is in header order in both modes (the reference's preload mode sorted them).

    Example:
        >>> import tempfile, os, torch
        >>> from cq.io import write_safetensors
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "m.safetensors")
        ...     write_safetensors(p, {"a.weight": torch.eye(2), "a.bias": torch.zeros(2)})
        ...     with UnifiedSafetensorsLoader(p, low_memory=True) as f:
        ...         print(f.keys(), f.get_shape("a.weight"), f.get_tensor("a.weight").sum().item())
        ['a.weight', 'a.bias'] (2, 2) 2.0
    """

    def __init__(self, path: str | os.PathLike, low_memory: bool = False):
        self.path = os.fspath(path)
        self.low_memory = bool(low_memory)
        self.header = read_header(self.path)
        self._cache: dict[str, torch.Tensor] = {}
        self._processed: set[str] = set()
        self._file = open(self.path, "rb")
        if not self.low_memory:
            try:
                for name, info in self.header.tensors.items():
                    self._cache[name] = read_tensor(self._file, info, self.path)
            finally:
                self._file.close()
        self._closed = False

    # -- context manager / container protocol ------------------------------------------------

    def __enter__(self) -> "UnifiedSafetensorsLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: object) -> bool:
        return key in self.header.tensors

    def __len__(self) -> int:
        return len(self.header.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def __repr__(self) -> str:
        mode = "streaming" if self.low_memory else "preloaded"
        return f"UnifiedSafetensorsLoader({self.path!r}, {len(self)} tensors, {mode})"

    # -- reference API ---------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.header.tensors)

    def metadata(self) -> dict[str, str]:
        """The header's ``__metadata__`` (a fresh dict; ``{}`` if the file has none)."""
        return dict(self.header.metadata)

    def _info(self, key: str) -> TensorInfo:
        try:
            return self.header.tensors[key]
        except KeyError:
            sample = ", ".join(list(self.header.tensors)[:3])
            raise KeyError(f"{key!r} is not a tensor of {self.path} ({len(self)} tensors, e.g. {sample})") from None

    def get_shape(self, key: str) -> tuple[int, ...]:
        """Shape from the header, without reading data."""
        return self._info(key).shape

    def get_ndim(self, key: str) -> int:
        return len(self._info(key).shape)

    def get_dtype(self, key: str) -> torch.dtype:
        return self._info(key).dtype

    def get_tensor(self, key: str) -> torch.Tensor:
        """A new tensor holding ``key``'s values (never a view of shared memory)."""
        info = self._info(key)
        if self._closed:
            raise InputError(f"{self.path}: loader is closed; open a new one to read {key!r}")
        if not self.low_memory:
            if key not in self._cache:
                raise InputError(f"{self.path}: {key!r} was released by mark_processed(); "
                                 "read it before marking it processed")
            return self._cache[key].clone()
        return read_tensor(self._file, info, self.path)

    def mark_processed(self, key: str) -> None:
        """Free ``key``'s cached tensor (preload mode); a no-op when streaming."""
        self._info(key)
        self._processed.add(key)
        self._cache.pop(key, None)

    def close(self) -> None:
        """Close the file and drop the cache; idempotent."""
        self._closed = True
        self._cache.clear()
        self._file.close()

    def __del__(self) -> None:
        # A loader dropped without close() must not leak its handle (ResourceWarning).
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()


#: The reference tool's other name for :class:`UnifiedSafetensorsLoader`.
MemoryEfficientSafeOpen = UnifiedSafetensorsLoader
