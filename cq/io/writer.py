"""Write safetensors files atomically, with bounded memory, and verify them by reading them back.

Tensor bytes stream to a temporary file in the output directory as they are added, so the writer
never holds more than one tensor. The data starts after a reserved header region; on a clean exit
the header is written into that region when it fits (padded with spaces, which the format allows)
so large files are written once. Small files, and headers that do not fit, are assembled compactly
in a second temporary file instead. The result is fsynced, read back and checked, and only then
moved onto the output path with ``os.replace``. Any failure removes the temporary files and
leaves an existing output untouched.

The default read-back check costs almost nothing: the header is parsed again and compared entry by
entry, and a CRC-32 of a few sampled windows of every tensor, taken from memory while writing, is
compared with the same windows read back (``verify="sampled"``). ``verify="checksum"`` re-reads
and checksums every byte (a second pass over the file: ~1 s per GiB); the file is fsynced once.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import weakref
import zlib
from typing import Iterable, Mapping

import torch

from ..errors import CqError, InputError
from .comfy import QUANT_METADATA_KEY, decode_comfy_quant
from .loader import DTYPE_NAMES, MAX_HEADER_BYTES, TensorInfo, byte_view, read_header, read_tensor

__all__ = ["SafetensorsWriter", "write_safetensors", "same_path"]

_COPY_CHUNK = 64 << 20  # bytes per copy/hash step: large enough to be I/O bound, small enough to bound memory
#: ``verify="sampled"``: bytes per window, and windows per tensor (first, last and evenly spaced
#: between): at most 64 KiB read back per tensor, and every byte of tensors up to that size.
SAMPLE_BYTES = 4096
SAMPLE_WINDOWS = 16
VERIFY_MODES = ("sampled", "checksum", "header")
#: Bytes reserved for the header ahead of the data (1 MiB holds ~8000 tensor entries). Files
#: whose header fits are written in one pass; the padding costs < 0.1 % of a >= 1 GiB file.
HEADER_RESERVE = 1 << 20
#: Data sections up to this size are rewritten compactly (header padded to 8 bytes only): the
#: copy is cheap there and a 1 MiB space-padded header would dominate a small file.
COMPACT_BELOW = 64 << 20


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file (same real path, or the same inode via links)."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _remove(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _copy_range(src, src_offset: int, dst, nbytes: int) -> None:
    """Append ``nbytes`` of ``src`` starting at ``src_offset`` to ``dst``: in-kernel where possible."""
    dst.flush()
    base = dst.tell()
    copied = 0
    if hasattr(os, "copy_file_range"):
        try:
            while copied < nbytes:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(nbytes - copied, 1 << 30),
                                       src_offset + copied, None)
                if n == 0:
                    break
                copied += n
        except OSError:  # e.g. a filesystem without support: redo it with plain reads
            copied = 0
        dst.seek(base + copied)  # resync the buffered object with the fd's offset
        dst.truncate()
    src.seek(src_offset + copied)
    while copied < nbytes:
        chunk = src.read(min(_COPY_CHUNK, nbytes - copied))
        if not chunk:
            raise CqError(f"temporary data file ended after {copied} of {nbytes} bytes; disk full?")
        dst.write(chunk)
        copied += len(chunk)


def _default_mode(fd: int) -> None:
    # mkstemp creates 0600 files; give the output the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
    except OSError:  # pragma: no cover - filesystems without permissions
        pass


class SafetensorsWriter:
    """Stream tensors into a new safetensors file; atomic, bounded-memory, verified on close.

    Use as a context manager; ``add(name, tensor)`` writes each tensor's bytes at once. The file
    appears at ``path`` only if the block exits cleanly and the read-back check passes:
    header parsed again, every tensor's dtype/shape/offsets compared, CRC-32s compared (of sampled
    windows of every tensor with ``verify="sampled"``, the default; of every byte with
    ``verify="checksum"``; none with ``verify="header"``), every ``.comfy_quant`` decoded, and
    ``_quantization_metadata`` (if present) compared with them.

    Args:
        path: output file; its parent directory is created.
        metadata: the header's ``__metadata__`` (str → str); omitted from the file when empty.
            :meth:`update_metadata` adds entries later (e.g. ``_quantization_metadata`` once every
            layer is known).
        forbid: paths the output must not be (the input files): refused before anything is written.
        verify: ``"sampled"`` (default) compares CRC-32s of up to 16 windows of 4 KiB per tensor,
            taken while writing, with the bytes on disk; ``"checksum"`` re-reads every tensor and
            compares whole-tensor CRC-32s; ``"header"`` checks the header, offsets and
            ``.comfy_quant`` entries only.

    Raises:
        InputError: ``path`` is one of ``forbid`` or a directory.
        CqError: a bad name, a duplicate, an unsupported dtype, or a failed read-back check.

    Example:
        >>> import tempfile, os, torch
        >>> from cq.io import UnifiedSafetensorsLoader
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "out", "m.safetensors")
        ...     with SafetensorsWriter(p, metadata={"source": "demo"}) as w:
        ...         w.add("a.weight", torch.arange(6, dtype=torch.int8).reshape(2, 3))
        ...     with UnifiedSafetensorsLoader(p, low_memory=True) as f:
        ...         print(f.keys(), f.metadata(), f.get_tensor("a.weight").tolist())
        ['a.weight'] {'source': 'demo'} [[0, 1, 2], [3, 4, 5]]
    """

    def __init__(self, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None,
                 forbid: Iterable[str | os.PathLike] = (), verify: str = "sampled"):
        self.path = os.fspath(path)
        for other in forbid:
            if same_path(self.path, other):
                raise InputError(f"{self.path}: the output path is the input file {os.fspath(other)}; "
                                 "choose a different output path (-o)")
        if os.path.isdir(self.path):
            raise InputError(f"{self.path}: the output path is a directory; give a file name")
        if verify not in VERIFY_MODES:
            raise CqError(f"verify={verify!r}; use 'sampled' (default: sampled CRC-32s), 'checksum' (every "
                          "byte read back) or 'header'")
        self.verify = verify
        self.metadata: dict[str, str] = {}
        self.update_metadata(metadata or {})
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int, int]] = {}  # dtype, shape, begin, end, crc
        self._offset = 0
        self._data = None
        self._data_path: str | None = None
        self._final_path: str | None = None
        self._state = "new"  # new → open → done | aborted
        self._finalizer = None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "SafetensorsWriter":
        if self._state != "new":
            raise CqError(f"{self.path}: a SafetensorsWriter can be entered once; create a new one")
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
            fd, self._data_path = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(self.path)}.",
                                                   suffix=".tmp")
        except OSError as e:
            raise InputError(f"{self.path}: cannot create the output directory or a temporary file "
                             f"there ({e.strerror or e})") from None
        self._data = os.fdopen(fd, "w+b")
        self._data.seek(HEADER_RESERVE)
        self._state = "open"
        # A writer that is never closed (no `with`, interpreter exit) still removes its temp files.
        self._finalizer = weakref.finalize(self, SafetensorsWriter._cleanup, self._data, self._data_path)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._state == "open":  # an explicit abort() inside the block stands
            self.commit()
        else:
            self.abort()

    @staticmethod
    def _cleanup(data, *paths: str | None) -> None:
        if data is not None and not data.closed:
            data.close()
        for p in paths:
            _remove(p)

    def abort(self) -> None:
        """Discard everything written so far; no output file is created (idempotent)."""
        if self._state in ("done", "aborted"):
            return
        self._state = "aborted"
        self._cleanup(self._data, self._data_path, self._final_path)
        if self._finalizer is not None:
            self._finalizer.detach()

    # -- adding tensors and metadata ---------------------------------------------------------

    def update_metadata(self, entries: Mapping[str, str]) -> None:
        """Add or replace ``__metadata__`` entries; allowed until the file is committed.

        Entries that depend on the tensors (``_quantization_metadata``) are set here at the end.
        """
        if self._state_is_final():
            raise CqError(f"{self.path}: metadata cannot change after the file was {self._state}")
        entries = dict(entries)
        for k, v in entries.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise CqError(f"metadata {k!r}: keys and values must be str (safetensors stores strings "
                              f"only), got {type(k).__name__} → {type(v).__name__}; json.dumps it first")
        self.metadata.update(entries)

    def _state_is_final(self) -> bool:
        return getattr(self, "_state", "new") in ("done", "aborted")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` under ``name``: its bytes go to disk now; nothing is kept in memory."""
        if self._state != "open":
            raise CqError(f"{self.path}: add({name!r}) outside the writer's `with` block "
                          f"(state: {self._state})")
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise CqError(f"{self.path}: tensor name {name!r} is not allowed; use a non-empty str other "
                          "than '__metadata__'")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise CqError(f"{self.path}: tensor name {name!r} is not valid UTF-8") from None
        if name in self._entries:
            raise CqError(f"{self.path}: tensor {name!r} was already added; each name is written once")
        if not isinstance(tensor, torch.Tensor):
            raise CqError(f"{self.path}: {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise CqError(f"{self.path}: {name!r} is a {type(tensor).__name__}, a tensor subclass whose raw "
                          "bytes are not its values; write its component tensors instead")
        dtype_name = DTYPE_NAMES.get(tensor.dtype)
        if dtype_name is None:
            raise CqError(f"{self.path}: {name!r} has dtype {tensor.dtype}, which safetensors/cq cannot "
                          f"store; allowed: {', '.join(str(d) for d in DTYPE_NAMES)}")
        # resolve_conj/neg: a lazily conjugated or negated view must be written by value
        t = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        view = byte_view(t)
        try:
            self._data.write(view)
        except OSError as e:
            self.abort()  # the data file now holds a partial tensor: nothing after it can be trusted
            raise CqError(f"{self.path}: writing {name!r} failed ({e.strerror or e}); disk full? "
                          "Nothing was written") from None
        if self.verify == "checksum":
            crc = zlib.crc32(view)
        elif self.verify == "sampled":
            crc = _sampled_crc(lambda start, size: view[start:start + size], len(view))
        else:
            crc = 0
        begin, end = self._offset, self._offset + len(view)
        self._entries[name] = (dtype_name, tuple(t.shape), begin, end, crc)
        self._offset = end

    # -- finishing ---------------------------------------------------------------------------

    def _header_bytes(self) -> bytes:
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        for name, (dtype_name, shape, begin, end, _) in self._entries.items():
            header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [begin, end]}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # safetensors aligns the data section to 8 bytes
        if len(raw) > MAX_HEADER_BYTES:
            raise CqError(f"{self.path}: header would be {len(raw)} bytes, over safetensors' limit of "
                          f"{MAX_HEADER_BYTES}; write fewer tensors or less metadata per file")
        return raw

    def commit(self) -> None:
        """Write the header, fsync, verify and atomically publish the file (a clean ``with`` exit)."""
        if self._state != "open":
            raise CqError(f"{self.path}: commit() on a writer that is {self._state}")
        try:
            header = self._header_bytes()
            self._data.flush()
            if 8 + len(header) <= HEADER_RESERVE and self._offset > COMPACT_BELOW:
                # One pass: the header (space-padded to the reserve) goes in front of the data.
                header += b" " * (HEADER_RESERVE - 8 - len(header))
                self._data.seek(0)
                self._data.write(struct.pack("<Q", len(header)) + header)
                self._data.flush()
                self._final_path, self._data_path = self._data_path, None
                out = self._data
            else:
                parent = os.path.dirname(os.path.abspath(self.path))
                fd, self._final_path = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(self.path)}.",
                                                        suffix=".tmp")
                out = os.fdopen(fd, "w+b")
                out.write(struct.pack("<Q", len(header)) + header)
                _copy_range(self._data, HEADER_RESERVE, out, self._offset)
                out.flush()
                self._data.close()
                _remove(self._data_path)
                self._data_path = None
            with out:
                _default_mode(out.fileno())
                os.fsync(out.fileno())
            self._verify(self._final_path)
            os.replace(self._final_path, self.path)
            self._final_path = None
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except BaseException:
            self.abort()
            raise
        self._state = "done"
        if self._finalizer is not None:
            self._finalizer.detach()

    def _verify(self, tmp: str) -> None:
        def fail(what: str) -> CqError:
            return CqError(f"{self.path}: read-back check failed: {what}; the output was not written")

        try:
            h = read_header(tmp)
        except InputError as e:
            raise fail(str(e)) from None
        if dict(h.metadata) != self.metadata:
            raise fail("header metadata differs from what was written")
        if list(h.tensors) != list(self._entries):
            raise fail("tensor names or order differ from what was written")
        if h.gaps():
            raise fail("; ".join(h.gaps()))
        comfy: dict[str, dict] = {}
        with open(tmp, "rb") as f:
            for name, (dtype_name, shape, begin, end, crc) in self._entries.items():
                info: TensorInfo = h.tensors[name]
                if (info.dtype_name, info.shape, info.start - h.data_start, info.end - h.data_start) != (
                        dtype_name, shape, begin, end):
                    raise fail(f"tensor {name!r} has header entry {info} instead of "
                               f"{dtype_name}{list(shape)} at [{begin}, {end})")
                if self.verify == "checksum" and _crc_range(f, info.start, info.nbytes) != crc:
                    raise fail(f"tensor {name!r}: bytes on disk differ from the bytes written (CRC-32)")
                if self.verify == "sampled" and _sampled_crc(_reader(f, info.start), info.nbytes) != crc:
                    raise fail(f"tensor {name!r}: bytes on disk differ from the bytes written (CRC-32 of "
                               "sampled windows)")
                if name.endswith(".comfy_quant"):
                    try:
                        comfy[name[: -len(".comfy_quant")]] = decode_comfy_quant(read_tensor(f, info, tmp), name=name)
                    except InputError as e:
                        raise fail(str(e)) from None
        if QUANT_METADATA_KEY in self.metadata:
            try:
                layers = json.loads(self.metadata[QUANT_METADATA_KEY])["layers"]
            except (ValueError, KeyError, TypeError) as e:
                raise fail(f"{QUANT_METADATA_KEY} is not JSON with a 'layers' object ({e})") from None
            if layers != comfy:
                only_h = sorted(set(layers) - set(comfy))[:3]
                only_t = sorted(set(comfy) - set(layers))[:3]
                differ = sorted(k for k in set(layers) & set(comfy) if layers[k] != comfy[k])[:3]
                raise fail(f"{QUANT_METADATA_KEY} disagrees with the .comfy_quant tensors (header only: "
                           f"{only_h}, tensors only: {only_t}, different: {differ})")


def _windows(nbytes: int) -> list[tuple[int, int]]:
    """``(start, size)`` of the sampled windows of an ``nbytes`` tensor: all of it when small."""
    if nbytes <= SAMPLE_BYTES * SAMPLE_WINDOWS:
        return [(0, nbytes)] if nbytes else []
    last = nbytes - SAMPLE_BYTES
    return [(i * last // (SAMPLE_WINDOWS - 1), SAMPLE_BYTES) for i in range(SAMPLE_WINDOWS)]


def _sampled_crc(read, nbytes: int) -> int:
    """CRC-32 of the windows of :func:`_windows`, each got as ``read(start, size)``."""
    crc = 0
    for start, size in _windows(nbytes):
        crc = zlib.crc32(read(start, size), crc)
    return crc


def _reader(f, base: int):
    def read(start: int, size: int) -> bytes:
        f.seek(base + start)
        return f.read(size)
    return read


def _crc_range(f, start: int, nbytes: int) -> int:
    f.seek(start)
    crc, left = 0, nbytes
    while left:
        chunk = f.read(min(_COPY_CHUNK, left))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return crc


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None,
                      forbid: Iterable[str | os.PathLike] = ()) -> None:
    """Write ``tensors`` (in mapping order) to ``path`` with :class:`SafetensorsWriter`.

    Example:
        >>> import tempfile, os, torch
        >>> from safetensors.torch import load_file
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "m.safetensors")
        ...     write_safetensors(p, {"x": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)})
        ...     load_file(p)["x"].tolist()
        [1.5, -2.0]
    """
    with SafetensorsWriter(path, metadata=metadata, forbid=forbid) as w:
        for name, t in tensors.items():
            w.add(name, t)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (JSON report, layer-config template) atomically: temp file + rename.

    Example:
        >>> import pathlib
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_text_atomic(os.path.join(d, "a.json"), "{}")
        ...     pathlib.Path(d, "a.json").read_text()
        '{}'
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".cq-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
