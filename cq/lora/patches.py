"""The patch model: what one LoRA layer does to one base tensor, computed as ComfyUI computes it.

A LoRA file's tensors of one layer prefix (grouped by :mod:`cq.io.lora_file`) become at most two
:class:`LoraPatch` values: one for the weight and one for the bias (``.diff_b`` / ``.b_norm``).
:func:`apply_patch` adds a patch to a float32 weight with the arithmetic of ComfyUI's
``comfy/lora.py: calculate_weight`` and ``comfy/weight_adapter/*`` (``W`` [N, K], ``s`` = strength):

* ``lora``: ``W += s · (alpha / r) · up @ down`` with ``r = down.shape[0]``; no alpha → ``alpha/r = 1``;
  conv factors are flattened, LoCon's ``lora_mid`` is folded into ``down`` first;
* ``loha``: ``W += s · (alpha / w1_b.shape[0]) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` (Tucker ``t1/t2`` too);
* ``lokr``: ``W += s · c · kron(w1, w2)``, each factor rebuilt from ``_a @ _b`` when stored split;
  ``c = alpha / dim`` **only** when a factor was stored split (``dim`` = that factor's ``_b.shape[0]``,
  ``w2``'s when both are), else 1;
* DoRA (``dora_scale`` with any of the three): ``W' = (W + c·Δ) · dora_scale / ‖W + c·Δ‖_col``, the norm
  taken over each input column, then ``W += s · (W' − W)``;
* ``diff``: ``W += s · diff``; ``set``: ``W = set_weight`` (strength ignored, as in ComfyUI).

A patch may target a slice of a fused weight (``offset``) and carry a function of the delta (Flux's
swapped ``norm_out``); both are applied here exactly as ComfyUI does.
"""

from __future__ import annotations

import math
import types
from typing import Mapping

import attrs
import torch

from ..errors import InputError
from .keymap import FUNCTIONS

__all__ = ["LoraPatch", "patches_from_group", "apply_patch", "KINDS", "LORA_SPELLINGS"]

KINDS = ("lora", "loha", "lokr", "diff", "set")

#: Plain-LoRA spellings in ComfyUI's order of preference: (up, down, mid or None).
LORA_SPELLINGS: tuple[tuple[str, str, str | None], ...] = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
)
_LOHA = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
_LOKR = (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
_REFUSED = {".a1.weight": "GLoRA", ".oft_blocks": "OFT", ".boft_blocks": "BOFT"}


def _shape(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else list(t.shape)


@attrs.frozen(eq=False)
class LoraPatch:
    """One patch of one base tensor: its kind, factor tensors by role, alpha, DoRA magnitude, name.

    Roles: ``lora``: ``up``, ``down``, ``mid``; ``loha``: ``w1a w1b w2a w2b t1 t2``; ``lokr``:
    ``w1 w2 w1a w1b w2a w2b t2``; ``diff``: ``diff``; ``set``: ``weight``. ``name`` is the LoRA
    prefix (for messages).
    """

    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    tensors: Mapping[str, torch.Tensor] = attrs.field(converter=lambda d: types.MappingProxyType(dict(d)),
                                                      repr=lambda t: "{" + ", ".join(f"{k}: {list(v.shape)}"
                                                                                     for k, v in t.items()) + "}")
    alpha: float | None = None
    dora_scale: torch.Tensor | None = attrs.field(default=None, repr=_shape)
    name: str = ""

    # -- the delta ------------------------------------------------------------------------------

    def scale(self) -> float:
        """The ``alpha / rank``-style factor ComfyUI multiplies the delta by (before strength)."""
        t, a = self.tensors, self.alpha
        if self.kind == "lora":
            return a / t["down"].shape[0] if a is not None else 1.0
        if self.kind == "loha":
            return a / t["w1b"].shape[0] if a is not None else 1.0
        if self.kind == "lokr":
            dim = None
            if "w1" not in t:
                dim = t["w1b"].shape[0]
            if "w2" not in t:
                dim = t["w2b"].shape[0]
            return a / dim if (a is not None and dim is not None) else 1.0
        return 1.0

    def raw_delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The unscaled delta (``up @ down``, the Hadamard or Kronecker product, ``diff``) as float32 ``shape``.

        Raises an :class:`~cq.errors.InputError` naming the patch when it cannot have ``shape``.
        """
        t = {k: v.detach().to(torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            up, down = t["up"], t["down"]
            if "mid" in t:
                mid = t["mid"]
                final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1))
                down = down.reshape(final).transpose(0, 1)
            up2, down2 = up.flatten(1), down.flatten(1)
            if up2.shape[1] != down2.shape[0]:
                raise self._error(f"up {list(up.shape)} and down {list(down.shape)} have different ranks", shape)
            self._check(up2.shape[0], down2.shape[1], shape)
            return torch.mm(up2, down2).reshape(shape)
        if self.kind == "loha":
            if "t1" in t:
                m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["t1"], t["w1b"], t["w1a"])
                m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["t2"], t["w2b"], t["w2a"])
            else:
                m1, m2 = torch.mm(t["w1a"], t["w1b"]), torch.mm(t["w2a"], t["w2b"])
            if m1.shape != m2.shape:
                raise self._error(f"its two Hadamard factors are {list(m1.shape)} and {list(m2.shape)}", shape)
            self._check(m1.shape[0], m1[0].numel(), shape)
            return (m1 * m2).reshape(shape)
        if self.kind == "lokr":
            w1 = t["w1"] if "w1" in t else torch.mm(t["w1a"], t["w1b"])
            if "w2" in t:
                w2 = t["w2"]
            elif "t2" in t:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["t2"], t["w2b"], t["w2a"])
            else:
                w2 = torch.mm(t["w2a"], t["w2b"])
            if w2.ndim == 4:
                w1 = w1.unsqueeze(2).unsqueeze(2)
            k = torch.kron(w1, w2)
            self._check(k.shape[0], k[0].numel(), shape)
            return k.reshape(shape)
        if self.kind == "diff":
            d = t["diff"]
            if tuple(d.shape) != tuple(shape):
                raise self._error(f"diff {list(d.shape)}", shape)
            return d
        raise AssertionError(self.kind)

    def _check(self, rows: int, cols: int, shape: tuple[int, ...]) -> None:
        n = shape[0] if len(shape) else 1
        k = math.prod(shape[1:]) if len(shape) > 1 else 1
        if rows != n or cols != k:
            raise self._error(f"a delta of [{rows}, {cols}]", shape)

    def _error(self, what: str, shape: tuple[int, ...]) -> InputError:
        return InputError(f"LoRA key {self.name!r} ({self.kind}): {what} does not fit the base tensor "
                          f"{list(shape)}; the LoRA was trained for another model (or another size of it)")

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise an :class:`~cq.errors.InputError` unless this patch fits a tensor of ``shape``."""
        if self.kind == "set":
            if tuple(self.tensors["weight"].shape) != tuple(shape):
                raise self._error(f"set_weight {list(self.tensors['weight'].shape)}", shape)
            return
        shape = tuple(shape)
        # the delta's [rows, columns] from the factor shapes alone: planning a merge must not compute it
        t = {k: tuple(v.shape) for k, v in self.tensors.items()}
        try:
            if self.kind == "lora":
                up, down = t["up"], t["down"]
                r_up = math.prod(up[1:])
                if "mid" in t:
                    mid = t["mid"]
                    if len(mid) != 4 or mid[1] != down[0]:
                        raise self._error(f"lora_mid {list(mid)} does not fit down {list(down)}", shape)
                    r_down, cols = mid[0], down[1] * mid[2] * mid[3]
                else:
                    r_down, cols = down[0], math.prod(down[1:])
                if r_up != r_down:
                    raise self._error(f"up {list(up)} and down {list(down)} have different ranks", shape)
                self._check(up[0], cols, shape)
            elif self.kind == "loha":
                if "t1" in t:
                    m1 = (t["w1a"][1], t["w1b"][1]) + t["t1"][2:]
                    m2 = (t["w2a"][1], t["w2b"][1]) + t["t2"][2:]
                else:
                    if t["w1a"][1] != t["w1b"][0] or t["w2a"][1] != t["w2b"][0]:
                        raise self._error(f"LoHa factors {t} have mismatched ranks", shape)
                    m1, m2 = (t["w1a"][0], t["w1b"][1]), (t["w2a"][0], t["w2b"][1])
                if m1 != m2:
                    raise self._error(f"its two Hadamard factors are {list(m1)} and {list(m2)}", shape)
                self._check(m1[0], math.prod(m1[1:]), shape)
            elif self.kind == "lokr":
                w1 = t["w1"] if "w1" in t else (t["w1a"][0], t["w1b"][1])
                if "w2" in t:
                    w2 = t["w2"]
                elif "t2" in t:
                    w2 = (t["w2a"][1], t["w2b"][1]) + t["t2"][2:]
                else:
                    w2 = (t["w2a"][0], t["w2b"][1])
                if len(w1) != 2:
                    raise self._error(f"lokr_w1 {list(w1)} is not a matrix", shape)
                self._check(w1[0] * w2[0], w1[1] * math.prod(w2[1:]), shape)
            elif self.kind == "diff" and t["diff"] != shape:
                raise self._error(f"diff {list(t['diff'])}", shape)
        except (KeyError, IndexError):
            raise self._error(f"its factors {t} are incomplete", shape) from None
        if self.dora_scale is not None:
            _dora_norm_shape(self, shape)


def _dora_norm_shape(patch: LoraPatch, shape: tuple[int, ...]) -> tuple[int, ...]:
    """ComfyUI normalises over each input column: a norm of shape [1, K, 1...]; dora_scale must fit it."""
    norm = (1, shape[1]) + (1,) * (len(shape) - 2) if len(shape) >= 2 else None
    ds = tuple(patch.dora_scale.shape)
    ok = norm is not None
    if ok:
        try:
            ok = tuple(torch.broadcast_shapes(ds, norm)) == norm
        except RuntimeError:
            ok = False
    if not ok:
        raise InputError(
            f"LoRA key {patch.name!r}: DoRA magnitude dora_scale {list(ds)} does not match ComfyUI's DoRA merge, "
            f"which normalises the {list(shape)} weight over its input columns (a [1, {shape[1] if len(shape) > 1 else '?'}]"
            " magnitude); a magnitude on the output axis would be merged differently by every tool, so cq refuses "
            "it. Merge this DoRA with the tool that trained it, or drop the file")
    return norm


def apply_patch(weight: torch.Tensor, patch: LoraPatch, strength: float = 1.0,
                offset: tuple[int, int, int] | None = None, function: str | None = None) -> torch.Tensor:
    """``weight`` with ``patch`` applied (a new float32 tensor; ``weight`` is not modified).

    Example:
        >>> w = torch.zeros(4, 2)
        >>> p = LoraPatch("lora", {"up": torch.ones(2, 1), "down": torch.ones(1, 2)}, alpha=0.5)
        >>> apply_patch(w, p, strength=2.0, offset=(0, 2, 2)).tolist()
        [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    """
    out = weight.detach().to(torch.float32, copy=True)
    w = out.narrow(*offset) if offset is not None else out
    fn = FUNCTIONS[function] if function else (lambda x: x)
    shape = tuple(w.shape)
    with torch.no_grad():
        if patch.kind == "set":
            patch.check(shape)
            w.copy_(patch.tensors["weight"].to(torch.float32))
            return out
        delta = patch.raw_delta(shape)
        scale = patch.scale()
        if patch.dora_scale is not None:
            _dora_norm_shape(patch, shape)
            dora = patch.dora_scale.detach().to(torch.float32)
            calc = w + fn(delta * scale)
            norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
            norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
            calc = calc * (dora / norm)
            if strength != 1.0:
                w += strength * (calc - w)
            else:
                w.copy_(calc)
        elif patch.kind == "diff":
            if strength != 0.0:
                w += fn(strength * delta)
        else:
            w += fn((strength * scale) * delta)
    return out


# ---------------------------------------------------------------------------------------------
# From a file's group of tensors to patches


def _alpha(prefix: str, group: Mapping[str, torch.Tensor]) -> float | None:
    a = group.get(".alpha")
    if a is None:
        return None
    if a.numel() != 1:
        raise InputError(f"LoRA key {prefix + '.alpha'!r} has shape {list(a.shape)}; alpha must be one number")
    value = float(a.reshape(()).to(torch.float64))
    if not math.isfinite(value):
        raise InputError(f"LoRA key {prefix + '.alpha'!r} is {value}; alpha must be finite")
    return value


def patches_from_group(prefix: str, group: Mapping[str, torch.Tensor]
                       ) -> tuple[LoraPatch | None, LoraPatch | None, frozenset[str]]:
    """``(weight patch, bias patch, suffixes used)`` for one layer prefix of a LoRA file.

    Follows ``comfy/lora.py: load_lora``: LoRA (first spelling found), LoHa, LoKr, ``w_norm``,
    ``diff`` and ``set_weight`` each give a weight patch; ``diff_b`` / ``b_norm`` a bias patch.
    Where ComfyUI would silently keep only the last of several weight patches, or crash on a half
    pair, this raises an :class:`~cq.errors.InputError` naming the key; GLoRA, OFT, BOFT and
    ``reshape_weight`` are refused. Suffixes not used are the caller's "not loaded" keys.

    Example:
        >>> w, b, used = patches_from_group("x", {".lora_up.weight": torch.ones(3, 1),
        ...                                       ".lora_down.weight": torch.ones(1, 2),
        ...                                       ".alpha": torch.tensor(4.0), ".diff_b": torch.ones(3)})
        >>> w.kind, w.scale(), b.kind, sorted(used)
        ('lora', 4.0, 'diff', ['.alpha', '.diff_b', '.lora_down.weight', '.lora_up.weight'])
    """
    for suffix, t in group.items():
        number = t.is_floating_point() or t.dtype in (torch.int64, torch.int32)
        if number and t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            t = t.to(torch.float32)  # float8 / integer tensors: isfinite is not defined for every dtype on CPU
        if not number or not bool(torch.isfinite(t).all()):
            raise InputError(f"LoRA key {prefix + suffix!r} ({t.dtype}, {list(t.shape)}) holds NaN/Inf or is not a "
                             "number tensor; the LoRA file is corrupt")
    for suffix, what in _REFUSED.items():
        if suffix in group:
            raise InputError(f"LoRA key {prefix + suffix!r}: {what} adapters are not supported by cq's merge; "
                             "remove this LoRA from the merge list (ComfyUI can still apply it at runtime)")
    if ".reshape_weight" in group:
        raise InputError(f"LoRA key {prefix + '.reshape_weight'!r} changes the base tensor's shape (a control "
                         "LoRA); cq cannot merge it into a file of the original shape")
    used: set[str] = set()
    alpha = _alpha(prefix, group)
    if alpha is not None:
        used.add(".alpha")
    dora = group.get(".dora_scale")
    if dora is not None:
        used.add(".dora_scale")
    weight_patches: list[LoraPatch] = []

    for up, down, mid in LORA_SPELLINGS:
        if up in group or down in group:
            if up not in group or down not in group:
                have, miss = (up, down) if up in group else (down, up)
                raise InputError(f"LoRA key {prefix + have!r} has no partner {prefix + miss!r}; the file is "
                                 "incomplete")
            t = {"up": group[up], "down": group[down]}
            used |= {up, down}
            if mid and mid in group:
                t["mid"] = group[mid]
                used.add(mid)
            weight_patches.append(LoraPatch("lora", t, alpha, dora, prefix))
            break

    if ".hada_w1_a" in group:
        missing = [s for s in _LOHA if s not in group]
        if missing:
            raise InputError(f"LoHa layer {prefix!r} lacks {', '.join(prefix + s for s in missing)}")
        t = {"w1a": group[".hada_w1_a"], "w1b": group[".hada_w1_b"], "w2a": group[".hada_w2_a"],
             "w2b": group[".hada_w2_b"]}
        used |= set(_LOHA)
        if ".hada_t1" in group:
            t["t1"], t["t2"] = group[".hada_t1"], group[".hada_t2"]
            used |= {".hada_t1", ".hada_t2"}
        weight_patches.append(LoraPatch("loha", t, alpha, dora, prefix))

    if any(s in group for s in (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a")):
        roles = dict(zip(_LOKR, ("w1", "w2", "w1a", "w1b", "w2a", "w2b", "t2")))
        t = {roles[s]: group[s] for s in _LOKR if s in group}
        used |= {s for s in _LOKR if s in group}
        for whole, a, b in (("w1", "w1a", "w1b"), ("w2", "w2a", "w2b")):
            if whole not in t and (a not in t or b not in t):
                raise InputError(f"LoKr layer {prefix!r} has neither .lokr_{whole} nor both .lokr_{whole}_a and "
                                 f".lokr_{whole}_b; the file is incomplete")
        weight_patches.append(LoraPatch("lokr", t, alpha, dora, prefix))

    bias = None
    if ".w_norm" in group:
        weight_patches.append(LoraPatch("diff", {"diff": group[".w_norm"]}, name=prefix))
        used.add(".w_norm")
        if ".b_norm" in group:
            bias = LoraPatch("diff", {"diff": group[".b_norm"]}, name=prefix + ".b_norm")
            used.add(".b_norm")
    if ".diff" in group:
        weight_patches.append(LoraPatch("diff", {"diff": group[".diff"]}, name=prefix))
        used.add(".diff")
    if ".diff_b" in group:
        bias = LoraPatch("diff", {"diff": group[".diff_b"]}, name=prefix + ".diff_b")
        used.add(".diff_b")
    if ".set_weight" in group:
        weight_patches.append(LoraPatch("set", {"weight": group[".set_weight"]}, name=prefix))
        used.add(".set_weight")

    if len(weight_patches) > 1:
        kinds = ", ".join(p.kind for p in weight_patches)
        raise InputError(f"LoRA layer {prefix!r} holds several patches of one weight ({kinds}); ComfyUI would "
                         "silently apply only the last one. Keep one of them in the file")
    if dora is not None and not (weight_patches and weight_patches[0].kind in ("lora", "loha", "lokr")):
        raise InputError(f"LoRA key {prefix + '.dora_scale'!r} has no LoRA/LoHa/LoKr factors to go with it")
    return (weight_patches[0] if weight_patches else None), bias, frozenset(used)
