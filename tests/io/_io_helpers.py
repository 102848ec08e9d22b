"""Helpers shared by the cq.io tests: random tensors of every dtype, raw file builders, hashes."""

from __future__ import annotations

import hashlib
import json
import struct

import torch

from cq.io import DTYPES


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bits for any dtype (floats include NaN/Inf/subnormal patterns); bools are 0/1."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    size = torch.empty((), dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * size,), generator=gen, dtype=torch.int64).to(torch.uint8)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def raw_file(path, header, data: bytes = b"", *, pad: bool = True) -> None:
    """Write a safetensors-like file from a header (dict or raw bytes) and data, with no checks."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        h += b" " * (-(8 + len(h)) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


ALL_DTYPES = list(DTYPES.values())
