"""LoRA files: loading (PEFT/diffusers, ComfyUI and kohya names), key matching and merging.

A LoRA adds ``ΔW = scale · (alpha / rank) · B @ A`` to a weight ``W`` [N, K], with ``A`` [r, K]
(``lora_A`` / ``lora_down``) and ``B`` [N, r] (``lora_B`` / ``lora_up``).

Differences from the reference (``convert_to_quant.utils.tensor_utils``), all deliberate:

* ``alpha`` comes from the ``<stem>.alpha`` tensor first (kohya files store it there; the
  reference ignored it and so merged kohya LoRAs ``alpha/rank`` times too strongly or weakly),
  then from the header metadata (``<stem with . → _>_alpha`` as the reference read it, then
  kohya's file-wide ``ss_network_alpha``), and only then defaults to ``rank``. The source is
  recorded in each entry's ``"alpha_source"``.
* Several LoRAs are dampened once, by ``0.9**i`` for the i-th (see :func:`merge_multiple_loras`);
  the reference's pipeline applied that factor twice (``0.81**i``).
* The merge never modifies its inputs and accumulates in float32 (float64 for float64 weights).
* Keys are returned as they are in the file (the stem before ``.lora_A.weight``); matching them
  to a model is :func:`lora_key_map`, which strips the usual prefixes at the *start* of a name
  only, understands kohya's ``lora_unet_`` names, and reports what it could not match instead of
  silently skipping it.
* A half pair (``A`` without ``B``), mismatched ranks, or a missing file is an
  :class:`~cq.errors.InputError`; tensors that are not LoRA matrices (DoRA ``dora_scale``,
  ``.diff``, LoKr/LoHa factors) produce a warning, because merging the rest would not reproduce
  what the file does.
"""

from __future__ import annotations

import math
import os
import types
import warnings
from typing import Any, Iterable, Mapping, Sequence

import attrs
import torch

from .errors import InputError

__all__ = [
    "LORA_PREFIXES",
    "KOHYA_PREFIXES",
    "DAMPEN_BASE",
    "load_lora_tensors",
    "load_lora_for_merging",
    "load_multiple_loras_for_merging",
    "lora_delta",
    "check_lora_fits",
    "merge_lora_into_weight",
    "merge_multiple_loras",
    "dampening",
    "LoraKeyMap",
    "lora_key_map",
    "layer_name",
]

_A_SUFFIXES = (".lora_A.weight", ".lora_down.weight")
_B_SUFFIXES = (".lora_B.weight", ".lora_up.weight")
_ALPHA_SUFFIX = ".alpha"

#: Prefixes stripped (repeatedly, at the start of a name only) before matching LoRA and model names.
LORA_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
#: kohya/sd-scripts prefixes; the rest of such a name is the model's layer name with ``.`` → ``_``.
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
#: The i-th LoRA merged into one layer is dampened by ``DAMPEN_BASE ** i`` (when dampening is on).
DAMPEN_BASE = 0.9


# ---------------------------------------------------------------------------------------------
# Loading


def _split(key: str) -> tuple[str, str] | None:
    """``(stem, role)`` with role ``A``, ``B`` or ``alpha``; ``None`` for other tensors."""
    for suffixes, role in ((_A_SUFFIXES, "A"), (_B_SUFFIXES, "B"), ((_ALPHA_SUFFIX,), "alpha")):
        for s in suffixes:
            if key.endswith(s) and len(key) > len(s):
                return key[: -len(s)], role
    return None


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputError(f"LoRA file not found: {p!r}")
    if os.path.isdir(p):
        raise InputError(f"LoRA path {p!r} is a directory; pass a .safetensors file")
    try:
        with safe_open(p, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"cannot read LoRA file {p!r} as safetensors: {e}") from None
    return tensors, meta


def _metadata_alpha(meta: Mapping[str, str], stem: str) -> float | None:
    candidates = [stem.replace(".", "_") + "_alpha", _strip_prefixes(stem).replace(".", "_") + "_alpha",
                  "ss_network_alpha"]
    for key in candidates:
        if key in meta:
            try:
                value = float(meta[key])
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                return value
    return None


def _warn_ignored(path: str, ignored: Sequence[str]) -> None:
    if not ignored:
        return
    shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
    dora = any(k.endswith("dora_scale") for k in ignored)
    warnings.warn(
        f"LoRA {os.path.basename(path)!r}: {len(ignored)} tensor(s) are not lora_A/lora_B/alpha and are NOT "
        f"merged: {shown}" + (" (DoRA magnitude vectors: cq merges plain LoRA only)" if dora else ""),
        UserWarning, stacklevel=3,
    )


def load_lora_for_merging(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Load a LoRA file as ``{stem: {"lora_A", "lora_B", "alpha", "rank", "alpha_source"}}``.

    ``stem`` is the file's key without ``.lora_A.weight`` / ``.lora_down.weight`` (no prefix is
    removed; :func:`lora_key_map` matches stems to a model). ``alpha`` is a float from the
    ``<stem>.alpha`` tensor, else the header metadata, else ``rank`` (``alpha_source`` says which:
    ``"tensor"``, ``"metadata"``, ``"rank"``). ``rank = lora_A.shape[0]``.

    Raises:
        InputError: missing or unreadable file, an A without its B (or the reverse), ranks that
            disagree between A and B.

    Example:
        >>> import tempfile, torch, safetensors.torch as st
        >>> tmp = tempfile.TemporaryDirectory()
        >>> p = tmp.name + "/l.safetensors"
        >>> st.save_file({"lora_unet_fc.lora_down.weight": torch.ones(2, 4),
        ...               "lora_unet_fc.lora_up.weight": torch.ones(3, 2),
        ...               "lora_unet_fc.alpha": torch.tensor(1.0)}, p)
        >>> e = load_lora_for_merging(p)["lora_unet_fc"]
        >>> e["rank"], e["alpha"], e["alpha_source"]
        (2, 1.0, 'tensor')
        >>> tmp.cleanup()
    """
    p = os.fspath(path)
    tensors, meta = _read(p)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    ignored = []
    for key, t in tensors.items():
        hit = _split(key)
        if hit is None:
            ignored.append(key)
            continue
        stem, role = hit
        if role in parts.setdefault(stem, {}):
            raise InputError(f"LoRA {p!r}: layer {stem!r} has two {role} matrices (e.g. both lora_A and "
                             "lora_down); keep one naming scheme")
        parts[stem][role] = t
    _warn_ignored(p, ignored)

    out: dict[str, dict[str, Any]] = {}
    for stem, roles in parts.items():
        if "A" not in roles and "B" not in roles:
            continue  # a bare alpha (e.g. for a layer the file does not train) carries nothing
        if ("A" in roles) != ("B" in roles):
            have, miss = ("lora_A/lora_down", "lora_B/lora_up") if "A" in roles else ("lora_B/lora_up",
                                                                                       "lora_A/lora_down")
            raise InputError(f"LoRA {p!r}: layer {stem!r} has {have} but no {miss}; the file is incomplete")
        a, b = roles["A"], roles["B"]
        if a.ndim < 2 or b.ndim < 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"LoRA {p!r}: layer {stem!r} has A {list(a.shape)} and B {list(b.shape)}; "
                             "expected A [rank, in] and B [out, rank] with the same rank")
        rank = int(a.shape[0])
        if "alpha" in roles and roles["alpha"].numel() == 1:
            alpha, source = float(roles["alpha"].reshape(()).to(torch.float64)), "tensor"
        else:
            alpha = _metadata_alpha(meta, stem)
            source = "metadata" if alpha is not None else "rank"
            alpha = float(rank) if alpha is None else alpha
        out[stem] = {"lora_A": a, "lora_B": b, "alpha": alpha, "rank": rank, "alpha_source": source}
    return out


def load_lora_tensors(path: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """``{stem: A}`` (the down/A matrices ``[rank, in]``) of a LoRA file; ``{}`` for an empty path."""
    if not path:
        return {}
    return {stem: e["lora_A"] for stem, e in load_lora_for_merging(path).items()}


def load_multiple_loras_for_merging(paths: Iterable[str | os.PathLike]) -> dict[str, list[dict[str, Any]]]:
    """``{stem: [entry, ...]}`` over several LoRA files, in path order; each entry gets ``"source"``.

    Unlike the reference, a missing path is an :class:`~cq.errors.InputError`, not skipped.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        for stem, entry in load_lora_for_merging(path).items():
            out.setdefault(stem, []).append({**entry, "source": os.path.basename(os.fspath(path))})
    return out


# ---------------------------------------------------------------------------------------------
# Merging


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def dampening(i: int, dampen: bool = True) -> float:
    """The factor of the ``i``-th (from 0) LoRA merged into a layer: ``0.9**i``, or 1 when off.

    Example:
        >>> [round(dampening(i), 3) for i in range(3)], dampening(2, dampen=False)
        ([1.0, 0.9, 0.81], 1.0)
    """
    return DAMPEN_BASE ** i if dampen else 1.0


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, rank: int, scale: float = 1.0, *,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
               name: str = "LoRA") -> torch.Tensor:
    """``scale · (alpha / rank) · B @ A`` as a new ``dtype`` tensor [N, K] (inputs untouched).

    Example:
        >>> lora_delta(torch.ones(1, 2), torch.full((2, 1), 2.0), alpha=1.0, rank=1, scale=0.5).tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise InputError(f"{name}: A {list(lora_A.shape)} and B {list(lora_B.shape)} do not form a LoRA; "
                         "expected A [rank, in] and B [out, rank] (conv LoRAs are not supported)")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise InputError(f"{name}: rank={rank!r} must be a positive int (normally A.shape[0] = {lora_A.shape[0]})")
    if not math.isfinite(float(alpha)) or not math.isfinite(float(scale)):
        raise InputError(f"{name}: alpha={alpha!r} and scale={scale!r} must be finite numbers")
    with torch.no_grad():
        a = lora_A.detach().to(device=device, dtype=dtype)
        b = lora_B.detach().to(device=device, dtype=dtype)
        return (b @ a) * (float(scale) * float(alpha) / rank)


def check_lora_fits(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Raise an :class:`~cq.errors.InputError` naming ``name`` unless ``B @ A`` has ``w``'s shape."""
    if w.ndim != 2 or a.ndim != 2 or b.ndim != 2 or b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1]:
        raise InputError(f"{name}: a LoRA with A {list(a.shape)}, B {list(b.shape)} does not fit the weight "
                         f"{list(w.shape)}; expected A [rank, {w.shape[-1]}] and B [{w.shape[0]}, rank]")


def merge_lora_into_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float,
                           rank: int, scale: float = 1.0) -> torch.Tensor:
    """``W + scale · (alpha/rank) · B @ A`` as a new tensor in ``W``'s dtype and device.

    Computed in float32 (float64 for a float64 ``W``) and rounded to ``W``'s dtype once; ``W``,
    ``A`` and ``B`` are never modified.

    Example:
        >>> w = torch.zeros(2, 3, dtype=torch.bfloat16)
        >>> m = merge_lora_into_weight(w, torch.ones(1, 3), torch.ones(2, 1), alpha=4.0, rank=1, scale=0.5)
        >>> m.dtype, m[0].tolist(), w.abs().sum().item()
        (torch.bfloat16, [2.0, 2.0, 2.0], 0.0)
    """
    check_lora_fits(weight, lora_A, lora_B, "merge_lora_into_weight")
    cd = _compute_dtype(weight)
    delta = lora_delta(lora_A, lora_B, alpha, rank, scale, dtype=cd, device=weight.device)
    with torch.no_grad():
        return (weight.detach().to(cd) + delta).to(weight.dtype)


def merge_multiple_loras(weight: torch.Tensor, lora_configs: Sequence[Mapping[str, Any]],
                         dampen: bool = True) -> torch.Tensor:
    """Merge several LoRAs into ``W``: the i-th (from 0) contributes ``config["scale"] · 0.9**i``.

    Each config holds ``lora_A``, ``lora_B``, ``alpha``, ``rank`` and optionally ``scale``
    (default 1). The dampening is applied once (``dampen=False`` turns it off). The deltas are
    summed in float32 (float64 for a float64 ``W``) and added to ``W`` once, so the result does
    not depend on intermediate roundings to ``W``'s dtype.

    Example:
        >>> cfg = {"lora_A": torch.ones(1, 2), "lora_B": torch.ones(2, 1), "alpha": 1.0, "rank": 1}
        >>> merge_multiple_loras(torch.zeros(2, 2), [cfg, cfg])[0].tolist()
        [1.899999976158142, 1.899999976158142]
    """
    cd = _compute_dtype(weight)
    total = torch.zeros(weight.shape, dtype=cd, device=weight.device)
    for i, c in enumerate(lora_configs):
        name = f"LoRA #{i}" + (f" ({c['source']})" if c.get("source") else "")
        check_lora_fits(weight, c["lora_A"], c["lora_B"], name)
        total += lora_delta(c["lora_A"], c["lora_B"], c["alpha"], c["rank"],
                            float(c.get("scale", 1.0)) * dampening(i, dampen), dtype=cd, device=weight.device,
                            name=name)
    with torch.no_grad():
        return (weight.detach().to(cd) + total).to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Matching LoRA names to model layers


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in LORA_PREFIXES:
            if name.startswith(p) and len(name) > len(p):
                name, changed = name[len(p):], True
    return name


def layer_name(key: str) -> str:
    """A model key's layer stem (``.weight`` removed) without the usual prefixes.

    Example:
        >>> layer_name("model.diffusion_model.double_blocks.0.img_attn.qkv.weight")
        'double_blocks.0.img_attn.qkv'
    """
    stem = key[: -len(".weight")] if key.endswith(".weight") else key
    return _strip_prefixes(stem)


@attrs.frozen
class LoraKeyMap:
    """Which model layer each LoRA entry targets.

    Calling it with a model key or stem returns the LoRA stems that target that layer (usually
    zero or one). ``targets`` maps LoRA stem → model stem; ``unmatched`` lists LoRA stems that
    target no model layer; ``ambiguous`` lists LoRA stems that fit several model layers (e.g. a
    model holding both ``transformer.x`` and ``x``) with the candidates; neither kind is merged.
    """

    targets: Mapping[str, str]
    unmatched: tuple[str, ...]
    ambiguous: Mapping[str, tuple[str, ...]]
    _by_layer: Mapping[str, tuple[str, ...]] = attrs.field(repr=False)

    def __call__(self, model_key: str) -> tuple[str, ...]:
        stem = model_key[: -len(".weight")] if model_key.endswith(".weight") else model_key
        return self._by_layer.get(stem, ())

    @property
    def complete(self) -> bool:
        """Whether every LoRA entry found exactly one model layer."""
        return not self.unmatched and not self.ambiguous

    def summary(self) -> str:
        """One line for logs: counts, and the first unmatched/ambiguous names."""
        parts = [f"{len(self.targets)} LoRA layer(s) matched"]
        for what, names in (("unmatched", self.unmatched), ("ambiguous", tuple(self.ambiguous))):
            if names:
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                parts.append(f"{len(names)} {what} ({shown})")
        return "; ".join(parts)


def lora_key_map(base_keys: Iterable[str], lora_bases: Iterable[str]) -> LoraKeyMap:
    """Match LoRA stems to model layers, reporting what does not match.

    ``base_keys``: the model's weight keys (``.weight`` is stripped) or layer stems.
    ``lora_bases``: LoRA stems (e.g. the keys of :func:`load_lora_for_merging`). Both sides lose
    the prefixes :data:`LORA_PREFIXES` at the start; a LoRA stem starting with a kohya prefix
    (:data:`KOHYA_PREFIXES`) is compared with the model names written with ``_`` for ``.``.

    Example:
        >>> m = lora_key_map(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"],
        ...                  ["lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.nope"])
        >>> m("model.diffusion_model.double_blocks.0.img_attn.qkv.weight"), m.unmatched
        (('lora_unet_double_blocks_0_img_attn_qkv',), ('diffusion_model.nope',))
    """
    dotted: dict[str, list[str]] = {}
    kohya: dict[str, list[str]] = {}
    for key in base_keys:
        stem = key[: -len(".weight")] if key.endswith(".weight") else key
        name = _strip_prefixes(stem)
        for index, k in ((dotted, name), (kohya, name.replace(".", "_"))):
            if stem not in index.setdefault(k, []):
                index[k].append(stem)

    targets: dict[str, str] = {}
    unmatched: list[str] = []
    ambiguous: dict[str, tuple[str, ...]] = {}
    by_layer: dict[str, list[str]] = {}
    for lora in dict.fromkeys(lora_bases):
        prefix = next((p for p in KOHYA_PREFIXES if lora.startswith(p)), None)
        found = kohya.get(lora[len(prefix):], []) if prefix else dotted.get(_strip_prefixes(lora), [])
        if not found:
            unmatched.append(lora)
        elif len(found) > 1:
            ambiguous[lora] = tuple(found)
        else:
            targets[lora] = found[0]
            by_layer.setdefault(found[0], []).append(lora)
    return LoraKeyMap(
        targets=types.MappingProxyType(targets),
        unmatched=tuple(unmatched),
        ambiguous=types.MappingProxyType(ambiguous),
        by_layer=types.MappingProxyType({k: tuple(v) for k, v in by_layer.items()}),
    )
