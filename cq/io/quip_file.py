"""Read QuIP layers stored in the two-sided transformed basis (``store_transformed``) back to the original basis.

Such a layer ``L`` holds ``L.weight`` (int8 codes ``q`` in the transformed basis), ``L.weight_scale``
(``s``: ``[N, 1]`` or ``()``), the signs ``L.sign_row`` / ``L.sign_col`` and the sizes
``L.hadamard_size_out`` / ``L.hadamard_size_in``, plus — only where a side is not the plain Sylvester
Hadamard — its Kronecker factors (``L.quip_kron_{out,in}``, ``L.quip_factor_{out,in}.i``) and the
optional column rescaling ``L.quip_col_scale``. The exact layout is documented in
:func:`cq.transforms.quip.quip_extra_tensors`; the weight is

    ``W = diag(sign_row) · F_out · (q ⊙ s) · F_inᵀ · diag(sign_col) / col_scale``.

Files written by the reference tool (``--quip-store-transformed``) use the same keys with Sylvester
factors and zero padding to powers of two; pass the original ``shape`` to cut the padding off.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from ..errors import InputError
from ..transforms.hadamard import KroneckerOrthogonal, paley_hadamard, sylvester_hadamard
from ..transforms.quip import KIND_CODES

__all__ = ["is_transformed_layer", "transformed_layers", "dequantize_transformed", "dequantize_transformed_file"]

_KIND_NAMES = {v: k for k, v in KIND_CODES.items()}
_REQUIRED = ("weight", "weight_scale", "sign_row", "sign_col")


def is_transformed_layer(keys: Iterable[str], layer: str) -> bool:
    """Whether ``keys`` hold a transformed QuIP layer named ``layer``.

    Example:
        >>> is_transformed_layer(["fc.weight", "fc.weight_scale", "fc.sign_row", "fc.sign_col"], "fc")
        True
    """
    keys = set(keys)
    return all(f"{layer}.{suffix}" in keys for suffix in _REQUIRED)


def transformed_layers(keys: Iterable[str]) -> list[str]:
    """Names of every transformed QuIP layer in ``keys`` (in key order).

    Example:
        >>> transformed_layers(["a.weight", "b.weight", "b.weight_scale", "b.sign_row", "b.sign_col"])
        ['b']
    """
    keys = list(keys)
    stems = [k[: -len(".sign_row")] for k in keys if k.endswith(".sign_row")]
    return [s for s in stems if is_transformed_layer(keys, s)]


def _get(tensors: Mapping[str, torch.Tensor], key: str, layer: str) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise InputError(f"{layer}: transformed QuIP layer lacks {key!r}; the file is incomplete") from None


def _side(tensors: Mapping[str, torch.Tensor], layer: str, side: str, signs: torch.Tensor) -> KroneckerOrthogonal:
    n = int(signs.numel())
    spec_key = f"{layer}.quip_kron_{side}"
    if spec_key not in tensors:
        if n & (n - 1):
            raise InputError(f"{layer}: side {side!r} has size {n}, not a power of two, and no {spec_key!r}; "
                             "cannot tell which transform was used")
        factors, kinds = (sylvester_hadamard(n),), ("sylvester",)
    else:
        spec = tensors[spec_key].to(torch.int64).reshape(-1, 2).tolist()
        factors, kinds = [], []
        for i, (code, size) in enumerate(spec):
            kind = _KIND_NAMES.get(code)
            if kind == "sylvester":
                f = sylvester_hadamard(size)
            elif kind == "paley":
                f = _get(tensors, f"{layer}.quip_factor_{side}.{i}", layer).to(torch.float64) / math.sqrt(size)
            elif kind == "random":
                f = _get(tensors, f"{layer}.quip_factor_{side}.{i}", layer).to(torch.float64)
            else:
                raise InputError(f"{layer}: unknown factor kind {code} in {spec_key!r}; known {KIND_CODES}")
            if tuple(f.shape) != (size, size):
                raise InputError(f"{layer}: factor {i} of side {side!r} has shape {list(f.shape)}, expected [{size}, {size}]")
            factors.append(f)
            kinds.append(kind)
        if math.prod(int(f.shape[0]) for f in factors) != n:
            raise InputError(f"{layer}: the factors of side {side!r} multiply to "
                             f"{math.prod(int(f.shape[0]) for f in factors)}, but its sign vector has {n} entries")
    return KroneckerOrthogonal(factors=tuple(factors), signs=signs.to(torch.float64), kinds=tuple(kinds))


def dequantize_transformed(tensors: Mapping[str, torch.Tensor], layer: str, *,
                           shape: tuple[int, int] | None = None) -> torch.Tensor:
    """The original-basis float32 weight of the transformed QuIP layer ``layer`` in ``tensors``.

    ``shape``: the original ``[N, K]``, to cut off zero padding (reference files only; cq never pads).

    Example:
        >>> from cq.state import LayerState
        >>> from cq.transforms.quip import QuIPConfig, quip_pipeline, quip_extra_tensors
        >>> w = torch.randn(12, 40)
        >>> s = quip_pipeline(QuIPConfig(store_transformed=True))(LayerState.from_weight("fc", w))
        >>> t = {"fc.weight": s.codes, "fc.weight_scale": s.scale, **quip_extra_tensors(s)}
        >>> float(((dequantize_transformed(t, "fc") - w).norm() / w.norm())) < 0.01
        True
    """
    q = _get(tensors, f"{layer}.weight", layer)
    scale = _get(tensors, f"{layer}.weight_scale", layer).to(torch.float32)
    if q.ndim != 2:
        raise InputError(f"{layer}: weight must be 2-D, got shape {list(q.shape)}")
    rows, cols = q.shape
    sign_row = _get(tensors, f"{layer}.sign_row", layer).reshape(-1)
    sign_col = _get(tensors, f"{layer}.sign_col", layer).reshape(-1)
    if sign_row.numel() != rows or sign_col.numel() != cols:
        raise InputError(f"{layer}: sign vectors [{sign_row.numel()}], [{sign_col.numel()}] do not match "
                         f"the weight [{rows}, {cols}]")
    if scale.numel() not in (1, rows):
        raise InputError(f"{layer}: weight_scale must be () or [{rows}, 1], got {list(scale.shape)}")
    w = q.to(torch.float32) * (scale.reshape(()) if scale.numel() == 1 else scale.reshape(rows, 1))
    t_u = _side(tensors, layer, "out", sign_row)
    t_v = _side(tensors, layer, "in", sign_col)
    w = t_u.apply_t(w.t().contiguous()).t()  # M_u · Ŵ'
    w = t_v.apply_t(w.contiguous())  # · M_vᵀ
    col_key = f"{layer}.quip_col_scale"
    if col_key in tensors:
        d = tensors[col_key].to(torch.float32).reshape(-1)
        if d.numel() != cols:
            raise InputError(f"{layer}: {col_key!r} has {d.numel()} entries, expected {cols}")
        w = w / d
    if shape is not None:
        n, k = shape
        if n > rows or k > cols:
            raise InputError(f"{layer}: shape {list(shape)} is larger than the stored weight [{rows}, {cols}]")
        w = w[:n, :k]
    return w.contiguous()


class _LazyFile(Mapping):
    def __init__(self, handle):
        self._h = handle
        self._keys = list(handle.keys())

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._h.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys


def dequantize_transformed_file(path, *, layers: Iterable[str] | None = None,
                                shapes: Mapping[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """``{layer: original-basis float32 weight}`` for every transformed QuIP layer of a safetensors file.

    Reads one layer's tensors at a time. ``layers`` restricts the set; ``shapes`` gives original
    shapes for padded (reference) files.
    """
    from .loader import UnifiedSafetensorsLoader

    with UnifiedSafetensorsLoader(path, low_memory=True) as handle:  # strict header checks, InputError on damage
        lazy = _LazyFile(handle)
        found = transformed_layers(lazy.keys())
        wanted = found if layers is None else list(layers)
        missing = [l for l in wanted if l not in found]
        if missing:
            raise InputError(f"{path}: no transformed QuIP layer named {missing}; found {found}")
        return {l: dequantize_transformed(lazy, l, shape=(shapes or {}).get(l)) for l in wanted}
