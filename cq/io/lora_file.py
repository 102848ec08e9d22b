"""LoRA files: read every tensor of a LoRA/LyCORIS safetensors file and group it by layer prefix.

A LoRA file holds, per adapted layer, a few tensors whose names are ``<prefix><suffix>``:
``lora_unet_x.lora_up.weight``, ``transformer.x.lora_B.weight``, ``x.alpha``, ``x.hada_w1_a`` ...
This module only splits names into ``(prefix, suffix)`` with the suffix spellings ComfyUI accepts
(``comfy/weight_adapter/*.py``, ``comfy/lora.py: load_lora``); what a group *means* (which base
weight, which arithmetic) is :mod:`cq.lora`'s business.

Names are split on the **longest** known suffix, so ``x.lora_B.default.weight`` is ``x`` +
``.lora_B.default.weight`` and never ``x.lora_B.default`` + ``.weight``.

Example:
    >>> import torch
    >>> f = lora_file_from_tensors({"lora_unet_fc.lora_up.weight": torch.zeros(4, 2),
    ...                             "lora_unet_fc.lora_down.weight": torch.zeros(2, 3),
    ...                             "lora_unet_fc.alpha": torch.tensor(2.0), "junk": torch.zeros(1)})
    >>> sorted(f.groups["lora_unet_fc"]), f.ungrouped
    (['.alpha', '.lora_down.weight', '.lora_up.weight'], ('junk',))
"""

from __future__ import annotations

import os
import types
from typing import Iterable, Mapping

import attrs
import torch

from ..errors import InputError

__all__ = ["LORA_SUFFIXES", "LoraFile", "read_lora_file", "lora_file_from_tensors", "split_lora_key"]

#: Every per-layer suffix ComfyUI reads from a LoRA file (plain LoRA in all its spellings, LoCon's
#: mid, alpha, DoRA, full diffs, set/reshape, LoHa, LoKr, GLoRA, OFT/BOFT).
LORA_SUFFIXES: tuple[str, ...] = (
    # plain LoRA: up/B [out, r] and down/A [r, in]
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight",
    "_lora.up.weight", "_lora.down.weight",
    ".lora_B.weight", ".lora_A.weight",
    ".lora.up.weight", ".lora.down.weight",
    ".lora_B", ".lora_A",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
    ".lora_B.default.weight", ".lora_A.default.weight",
    # per-layer scalars and extras
    ".alpha", ".dora_scale", ".reshape_weight", ".set_weight",
    ".diff", ".diff_b", ".w_norm", ".b_norm",
    # LoHa, LoKr
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    # formats cq recognises in order to refuse them clearly
    ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight",
    ".oft_blocks", ".oft_diag", ".rescale", ".boft_blocks",
)
_BY_LENGTH = tuple(sorted(LORA_SUFFIXES, key=len, reverse=True))


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``(prefix, suffix)`` for a LoRA tensor name, by the longest known suffix; ``None`` if none fits.

    Example:
        >>> split_lora_key("transformer.a.to_q.lora_B.default.weight")
        ('transformer.a.to_q', '.lora_B.default.weight')
        >>> split_lora_key("x.lora_B"), split_lora_key("x.weight")
        (('x', '.lora_B'), None)
    """
    for s in _BY_LENGTH:
        if key.endswith(s) and len(key) > len(s):
            return key[: -len(s)], s
    return None


def _group(keys: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    groups: dict[str, dict[str, str]] = {}
    ungrouped: list[str] = []
    for k in keys:
        hit = split_lora_key(k)
        if hit is None:
            ungrouped.append(k)
        else:
            groups.setdefault(hit[0], {})[hit[1]] = k
    return groups, ungrouped


def _frozen(d):
    return types.MappingProxyType(dict(d))


@attrs.frozen(eq=False)
class LoraFile:
    """Every tensor of one LoRA file, and its names grouped by layer prefix.

    ``groups[prefix][suffix]`` is a tensor; ``ungrouped`` lists names with no known suffix (ComfyUI
    would log them as ``lora key not loaded``). ``name`` is what reports call the file.
    """

    name: str
    tensors: Mapping[str, torch.Tensor] = attrs.field(converter=_frozen, repr=lambda t: f"<{len(t)} tensors>")
    metadata: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen, repr=False)
    path: str | None = None

    _grouping: tuple = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self):
        # grouped once: a LoRA file of a large model has thousands of names
        object.__setattr__(self, "_grouping", _group(self.tensors))

    @property
    def groups(self) -> Mapping[str, Mapping[str, torch.Tensor]]:
        """``{prefix: {suffix: tensor}}``."""
        return {p: {s: self.tensors[k] for s, k in g.items()} for p, g in self._grouping[0].items()}

    @property
    def group_keys(self) -> Mapping[str, Mapping[str, str]]:
        """``{prefix: {suffix: tensor name}}``."""
        return self._grouping[0]

    @property
    def ungrouped(self) -> tuple[str, ...]:
        """Names with no known suffix, in file order."""
        return tuple(self._grouping[1])

    def renamed(self, rename: Mapping[str, str]) -> "LoraFile":
        """The same file with tensor names replaced by ``rename[name]`` where given."""
        return attrs.evolve(self, tensors={rename.get(k, k): t for k, t in self.tensors.items()})


def lora_file_from_tensors(tensors: Mapping[str, torch.Tensor], name: str = "<memory>",
                           metadata: Mapping[str, str] | None = None) -> LoraFile:
    """A :class:`LoraFile` over in-memory tensors (tests, Python users)."""
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise InputError(f"LoRA {name!r}: {k!r} is a {type(t).__name__}, not a torch.Tensor")
    return LoraFile(name=name, tensors=tensors, metadata=metadata or {})


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA safetensors file (all tensors; LoRA files are small).

    Raises:
        InputError: the path is missing, a directory, not a safetensors file, truncated, or holds
            no tensors.

    Example:
        >>> import tempfile, torch
        >>> from cq.io import write_safetensors
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_safetensors(d + "/l.safetensors", {"x.lora_A.weight": torch.zeros(1, 2),
        ...                                              "x.lora_B.weight": torch.zeros(2, 1)})
        ...     f = read_lora_file(d + "/l.safetensors")
        >>> f.name, sorted(f.groups["x"])
        ('l.safetensors', ['.lora_A.weight', '.lora_B.weight'])
    """
    from .loader import UnifiedSafetensorsLoader

    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputError(f"LoRA file not found: {p!r}; pass the path of a .safetensors LoRA file")
    if os.path.isdir(p):
        raise InputError(f"LoRA path {p!r} is a directory; pass a .safetensors file")
    try:
        with UnifiedSafetensorsLoader(p, low_memory=False) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata() or {})
    except InputError as e:
        raise InputError(f"cannot read LoRA file {p!r} as safetensors: {e}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read LoRA file {p!r} as safetensors: {e}") from None
    if not tensors:
        raise InputError(f"LoRA file {p!r} holds no tensors; it is not a LoRA")
    return LoraFile(name=os.path.basename(p), tensors=tensors, metadata=meta, path=p)
