"""SmoothQuant that preserves the function: per-channel factors folded exactly into a neighbouring layer.

SmoothQuant (Xiao et al. 2023) divides a Linear's input channel ``j`` by ``s_j`` and multiplies the
weight's column ``j`` by ``s_j``: ``(x/s)·(W·diag(s))ᵀ = x·Wᵀ``. The division must happen somewhere,
and a vanilla ComfyUI file has no field for it (it would ignore one), so cq applies smoothing only
where the division **folds exactly** into the tensor that produces the input:

==============================  ======================================================  ==========
mapping (``kind``)              producer edit (÷ s)                                     consumer(s)
==============================  ======================================================  ==========
Flux-1 ``*_mod`` / single       adaLN ``shift`` rows and bias ÷ s; ``scale`` rows ÷ s,   ``qkv``,
``modulation`` / final layer    bias ``(1 + b)/s − 1``                                  ``mlp.0``,
(``modulation``)                                                                        ``linear1``,
                                                                                        ``linear``
V → output projection           V rows (and bias) of the value / fused qkv Linear       attention
(``v_to_o``)                                                                            out proj
gated MLP (``gated_mlp``)       the ``up`` Linear's rows (and bias); Flux-2: the         ``down``,
                                value half of ``mlp.0`` / of ``linear1``'s MLP rows      ``mlp.2``,
                                                                                        ``linear2``
pre-norm affine (``norm``)      the norm's weight (and bias)                            the Linears
                                                                                        it feeds
==============================  ======================================================  ==========

Structure is read from key names and shapes (Flux-1 ``double_blocks`` / ``single_blocks`` /
``final_layer``; BERT ``attention.self.value`` → ``attention.output.dense``; CLIP / Llama / T5
attention, MLP and pre-norm names; Flux-2's bias-free shared modulations cannot take a fold, its
SiLU-gated MLPs can: only the value half is divided). Post-LN encoders (BERT, MiniLM) get **only** V → O: their
LayerNorm output is also the residual stream, so a fold into it is not exact. In Flux-1 double
blocks the image and text V rows share one factor (they meet in one attention) and both ``proj``
inputs get it. Modulation factors are normalised to ``max s = 1`` (raw factors make the folded
bias ``(1 + b)/s − 1`` large, and bf16 storage of it would lose the gain; algorithms.md); V → O
factors are not (``linear2`` also takes the unsmoothed MLP channels).

Per mapping, ``α`` is searched over ``cfg.alphas`` against the W8A8 output error (ComfyUI's per-token
int8 activations, per-row RTN weights, optional ConvRot) of the consumers on inputs drawn from the
calibration Hessian; a mapping is folded only if its best ``α`` lowers that error by at least
``cfg.min_gain``, else it is skipped and listed. Nothing extra is written to the file.

Runtime LoRAs trained on the original weights no longer match the folded layers (both the producer's
rows and the consumer's columns changed); the returned edits carry a warning that names them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import attrs
import torch

from ..errors import ConfigError
from ..model import ModelEdits, ModelView
from ..pipeline import stage
from ..state import LayerState, record

__all__ = ["SmoothQuantConfig", "Fold", "RowEdit", "find_folds", "fold_factors", "fold_edits", "smoothquant",
           "smoothing_error"]


# ---------------------------------------------------------------------------------------------
# Structure


@attrs.frozen
class RowEdit:
    """Divide entries ``[start, stop)`` of ``key`` (rows of a 2-D weight, entries of a vector) by ``s``.

    ``affine_one``: the entries are an adaLN ``scale`` bias, used as ``1 + b``: ``b ← (1 + b)/s − 1``.
    """

    key: str
    start: int
    stop: int
    affine_one: bool = False


@attrs.frozen
class Fold:
    """One exact fold: the consumers' input columns ``[col_start, col_start + width)`` × s, the producers ÷ s."""

    name: str
    kind: str  # "modulation" | "v_to_o" | "gated_mlp" | "norm"
    consumers: tuple[str, ...]  # weight stems (keys without ".weight")
    width: int
    producers: tuple[RowEdit, ...]
    col_start: int = 0
    normalize: bool = False


def _has(view: ModelView, key: str) -> bool:
    try:
        return key in view  # type: ignore[operator]
    except TypeError:
        return key in set(view.keys())


def _rows(view: ModelView, stem: str, start: int, stop: int, *, affine_one: bool = False) -> list[RowEdit]:
    out = [RowEdit(f"{stem}.weight", start, stop)]
    if _has(view, f"{stem}.bias"):
        out.append(RowEdit(f"{stem}.bias", start, stop, affine_one=affine_one))
    return out


def _mod_edits(view: ModelView, stem: str, h: int, shift: int, scale: int) -> list[RowEdit]:
    """Producer edits of an adaLN Linear whose chunk ``shift`` / ``scale`` (of width ``h``) feed one input."""
    return (_rows(view, stem, shift * h, (shift + 1) * h)
            + _rows(view, stem, scale * h, (scale + 1) * h, affine_one=True))


def _in_features(view: ModelView, stem: str) -> int | None:
    key = f"{stem}.weight"
    if not _has(view, key):
        return None
    shape = view.shape(key)
    return shape[1] if len(shape) == 2 else None


def _out_features(view: ModelView, stem: str) -> int | None:
    key = f"{stem}.weight"
    if not _has(view, key):
        return None
    shape = view.shape(key)
    return shape[0] if len(shape) == 2 else None


_NO_BIAS = ("the modulation Linear has no bias, so (1 + scale)/s cannot absorb the 1/s − 1 offset; "
            "the fold would not be exact")


def _double_v_to_proj(view: ModelView, blk: str, h: int) -> list[Fold]:
    """V rows of both streams' fused qkv → both ``proj`` inputs, one factor (they meet in one attention)."""
    qkvs = [f"{blk}.{st}_attn.qkv" for st in ("img", "txt")]
    projs = [f"{blk}.{st}_attn.proj" for st in ("img", "txt")]
    if all(_out_features(view, q) == 3 * h for q in qkvs) and all(_in_features(view, p) == h for p in projs):
        edits = [e for q in qkvs for e in _rows(view, q, 2 * h, 3 * h)]
        return [Fold(f"{blk} V -> proj (img+txt, one factor)", "v_to_o", tuple(projs), h, tuple(edits))]
    return []


def _silu_gated(view: ModelView, prefix: str) -> bool:
    """Flux-2 layout: blocks' MLPs are ``silu(first half) · second half`` (ComfyUI's ``mlp_silu_act``).

    ComfyUI switches it on exactly for files with the shared ``double_stream_modulation_img``; files
    with ``img_mlp.gate_proj`` (its ``yak_mlp`` variant) gate the other half and are not folded.
    """
    return (_has(view, f"{prefix}double_stream_modulation_img.lin.weight")
            and not _has(view, f"{prefix}double_blocks.0.img_mlp.gate_proj.weight"))


_YAK = "gated MLP of ComfyUI's yak_mlp variant (gate_proj/up_proj): which half is gated is not certain; not folded"


def _double_without_mod(view: ModelView, prefix: str, blk: str, skipped: list[dict]) -> list[Fold]:
    """A double block whose modulation lives elsewhere (Flux-2's shared one, Chroma's): V → proj, gated MLPs."""
    h = _in_features(view, f"{blk}.img_attn.qkv")
    if h is None:
        return []
    folds = _double_v_to_proj(view, blk, h)
    gated = _silu_gated(view, prefix)
    for st in ("img", "txt"):
        up, down = f"{blk}.{st}_mlp.0", f"{blk}.{st}_mlp.2"
        if _has(view, f"{blk}.{st}_mlp.gate_proj.weight"):
            skipped.append({"layers": [f"{blk}.{st}_mlp"], "reason": _YAK})
            continue
        n, k = _out_features(view, up), _in_features(view, down)
        if not gated or n is None or k is None or _in_features(view, up) != h:
            continue  # GELU MLP (Flux-1 layout, Chroma): nothing exact to fold into
        if n != 2 * k:
            skipped.append({"layers": [up, down], "reason": f"SiLU-gated MLP expected {up} to have 2·{k} rows "
                                                           f"({down}'s inputs), found {n}"})
            continue
        folds.append(Fold(f"{up}[{k}:{n}] (gated value) -> {down}", "gated_mlp", (down,), k,
                          tuple(_rows(view, up, k, n))))
    return folds


def _single_without_mod(view: ModelView, prefix: str, blk: str, skipped: list[dict]) -> list[Fold]:
    """A single block whose modulation lives elsewhere: V → ``linear2[:hidden]``, the gated MLP value → the rest."""
    l1, l2 = f"{blk}.linear1", f"{blk}.linear2"
    h, n1, k2 = _in_features(view, l1), _out_features(view, l1), _in_features(view, l2)
    if h is None or n1 is None or k2 is None or k2 <= h:
        return []
    m = k2 - h
    gated = _silu_gated(view, prefix)
    if _has(view, f"{prefix}double_blocks.0.img_mlp.gate_proj.weight"):
        skipped.append({"layers": [l1, l2], "reason": _YAK})
        return []
    if n1 == 3 * h + (2 * m if gated else m):
        folds = [Fold(f"{blk} V -> linear2[:hidden]", "v_to_o", (l2,), h, tuple(_rows(view, l1, 2 * h, 3 * h)))]
        if gated:
            folds.append(Fold(f"{l1}[{3 * h + m}:{n1}] (gated value) -> linear2[hidden:]", "gated_mlp", (l2,), m,
                              tuple(_rows(view, l1, 3 * h + m, n1)), col_start=h))
        return folds
    skipped.append({"layers": [l1, l2], "reason": f"single block: {l1} has {n1} rows, expected 3·{h} + "
                                                  f"{'2·' if gated else ''}{m} for {l2}'s {k2} inputs"})
    return []


def _flux_folds(view: ModelView, keys: list[str], skipped: list[dict]) -> list[Fold]:
    folds = []
    for key in keys:
        if re.search(r"(_mod\.lin|modulation\.lin|adaLN_modulation\.1)\.weight$", key) and not _has(
                view, key[: -len("weight")] + "bias") and "stream_modulation" not in key:
            skipped.append({"layers": [key[: -len(".weight")]], "reason": _NO_BIAS})
        m = re.match(r"^(.*?)double_blocks\.(\d+)\.img_mod\.lin\.weight$", key)
        if m:
            blk = f"{m.group(1)}double_blocks.{m.group(2)}"
            h = view.shape(key)[1]
            ok = True
            for st in ("img", "txt"):
                mod = f"{blk}.{st}_mod.lin"
                if _out_features(view, mod) != 6 * h:
                    ok = False
                    skipped.append({"layers": [mod], "reason": "not a Flux-1 double-block modulation (6·hidden rows)"})
                    continue
                if not _has(view, f"{mod}.bias"):
                    continue
                for cons, shift, scale in ((f"{blk}.{st}_attn.qkv", 0, 1), (f"{blk}.{st}_mlp.0", 3, 4)):
                    if _in_features(view, cons) != h:
                        skipped.append({"layers": [cons], "reason": f"expected in_features {h} after {mod}"})
                        continue
                    folds.append(Fold(f"{mod} -> {cons}", "modulation", (cons,), h,
                                      tuple(_mod_edits(view, mod, h, shift, scale)), normalize=True))
            if ok:
                folds += _double_v_to_proj(view, blk, h)
            continue
        m = re.match(r"^(.*?)single_blocks\.(\d+)\.modulation\.lin\.weight$", key)
        if m:
            blk = f"{m.group(1)}single_blocks.{m.group(2)}"
            h = view.shape(key)[1]
            mod, l1, l2 = f"{blk}.modulation.lin", f"{blk}.linear1", f"{blk}.linear2"
            if _out_features(view, mod) != 3 * h or _in_features(view, l1) != h:
                skipped.append({"layers": [mod, l1], "reason": "not a Flux-1 single block (3·hidden modulation rows)"})
                continue
            if _has(view, f"{mod}.bias"):
                folds.append(Fold(f"{mod} -> {l1}", "modulation", (l1,), h, tuple(_mod_edits(view, mod, h, 0, 1)),
                                  normalize=True))
            n1, k2 = _out_features(view, l1), _in_features(view, l2)
            if n1 is not None and k2 is not None and n1 >= 3 * h and k2 == h + (n1 - 3 * h):
                folds.append(Fold(f"{blk} V -> linear2[:hidden]", "v_to_o", (l2,), h,
                                  tuple(_rows(view, l1, 2 * h, 3 * h)), col_start=0))
            continue
        if re.search(r"(double_stream_modulation_(img|txt)|single_stream_modulation)\.lin(ear)?\.weight$", key):
            stem = key[: -len(".weight")]
            why = ("modulation shared across blocks (Flux-2 style) without a bias: (1 + scale)/s cannot absorb the "
                   "1/s − 1 offset, so no fold into it is exact" if not _has(view, f"{stem}.bias") else
                   "modulation shared across blocks (Flux-2 style): one common factor would have to serve every "
                   "block's inputs; not folded")
            skipped.append({"layers": [stem], "reason": why})
            continue
        m = re.match(r"^(.*?)double_blocks\.(\d+)\.img_attn\.qkv\.weight$", key)
        if m and not _has(view, f"{m.group(1)}double_blocks.{m.group(2)}.img_mod.lin.weight"):
            folds += _double_without_mod(view, m.group(1), f"{m.group(1)}double_blocks.{m.group(2)}", skipped)
            continue
        m = re.match(r"^(.*?)single_blocks\.(\d+)\.linear1\.weight$", key)
        if m and not _has(view, f"{m.group(1)}single_blocks.{m.group(2)}.modulation.lin.weight"):
            folds += _single_without_mod(view, m.group(1), f"{m.group(1)}single_blocks.{m.group(2)}", skipped)
            continue
        m = re.match(r"^(.*?)final_layer\.adaLN_modulation\.1\.weight$", key)
        if m:
            mod, lin = f"{m.group(1)}final_layer.adaLN_modulation.1", f"{m.group(1)}final_layer.linear"
            h = view.shape(key)[1]
            if _out_features(view, mod) == 2 * h and _in_features(view, lin) == h and _has(view, f"{mod}.bias"):
                folds.append(Fold(f"{mod} -> {lin}", "modulation", (lin,), h, tuple(_mod_edits(view, mod, h, 0, 1)),
                                  normalize=True))
    return folds


# (producer regex on a weight key, consumer suffixes relative to group 1, kind)
_VO = (
    (r"^(.*attention)\.self\.value\.weight$", ("{p}.output.dense",)),  # BERT / MiniLM (post-LN: only this)
    (r"^(.*self_attn)\.v_proj\.weight$", ("{p}.o_proj", "{p}.out_proj")),  # Llama / CLIP
    (r"^(.*SelfAttention)\.v\.weight$", ("{p}.o",)),  # T5
)
_GATED = (
    (r"^(.*mlp)\.up_proj\.weight$", "{p}.gate_proj", "{p}.down_proj"),  # Llama
    (r"^(.*DenseReluDense)\.wi_1\.weight$", "{p}.wi_0", "{p}.wo"),  # T5 v1.1 gated-GELU
)
_NORMS = (
    (r"^(.*)\.input_layernorm\.weight$", ("{p}.self_attn.q_proj", "{p}.self_attn.k_proj", "{p}.self_attn.v_proj")),
    (r"^(.*)\.post_attention_layernorm\.weight$", ("{p}.mlp.gate_proj", "{p}.mlp.up_proj")),
    (r"^(.*)\.layer_norm1\.weight$", ("{p}.self_attn.q_proj", "{p}.self_attn.k_proj", "{p}.self_attn.v_proj")),
    (r"^(.*)\.layer_norm2\.weight$", ("{p}.mlp.fc1",)),
    (r"^(.*layer\.0)\.layer_norm\.weight$", ("{p}.SelfAttention.q", "{p}.SelfAttention.k", "{p}.SelfAttention.v")),
    (r"^(.*layer\.1)\.layer_norm\.weight$", ("{p}.DenseReluDense.wi_0", "{p}.DenseReluDense.wi_1",
                                               "{p}.DenseReluDense.wi")),
)


def _generic_folds(view: ModelView, keys: list[str], skipped: list[dict]) -> list[Fold]:
    folds = []
    for key in keys:
        for pat, cons_t in _VO:
            m = re.match(pat, key)
            if not m:
                continue
            stem = key[: -len(".weight")]
            cons = [c.format(p=m.group(1)) for c in cons_t]
            cons = [c for c in cons if _has(view, f"{c}.weight")]
            n = _out_features(view, stem)
            if not cons:
                skipped.append({"layers": [stem], "reason": "no attention output projection found for this V"})
            elif any(_in_features(view, c) != n for c in cons):
                skipped.append({"layers": [stem] + cons, "reason": "V width differs from the output projection's "
                                "input (grouped-query attention): no exact per-channel fold"})
            else:
                folds.append(Fold(f"{stem} -> {cons[0]}", "v_to_o", tuple(cons), n, tuple(_rows(view, stem, 0, n))))
        for pat, gate_t, down_t in _GATED:
            m = re.match(pat, key)
            if not m:
                continue
            stem = key[: -len(".weight")]
            gate, down = gate_t.format(p=m.group(1)), down_t.format(p=m.group(1))
            n = _out_features(view, stem)
            if _has(view, f"{gate}.weight") and _in_features(view, down) == n:
                folds.append(Fold(f"{stem} -> {down}", "gated_mlp", (down,), n, tuple(_rows(view, stem, 0, n))))
        for pat, cons_t in _NORMS:
            m = re.match(pat, key)
            if not m:
                continue
            norm = key[: -len(".weight")]
            cons = [c.format(p=m.group(1)) for c in cons_t]
            cons = [c for c in cons if _has(view, f"{c}.weight")]
            if not cons or len(view.shape(key)) != 1:
                continue
            k = view.shape(key)[0]
            if any(_in_features(view, c) != k for c in cons):
                skipped.append({"layers": [norm] + cons, "reason": "norm width differs from its Linears' inputs"})
                continue
            edits = [RowEdit(key, 0, k)] + ([RowEdit(f"{norm}.bias", 0, k)] if _has(view, f"{norm}.bias") else [])
            folds.append(Fold(f"{norm} -> {', '.join(cons)}", "norm", tuple(cons), k, tuple(edits)))
    return folds


def find_folds(view: ModelView) -> tuple[list[Fold], list[dict]]:
    """Every exact fold cq recognises in ``view``, and the layers it looked at and had to skip (with why).

    Example:
        >>> from cq.model import DictView
        >>> v = DictView({"enc.attention.self.value.weight": torch.zeros(4, 4),
        ...               "enc.attention.output.dense.weight": torch.zeros(4, 4)})
        >>> [f.kind for f in find_folds(v)[0]]
        ['v_to_o']
    """
    keys = list(view.keys())
    skipped: list[dict] = []
    folds = _flux_folds(view, keys, skipped) + _generic_folds(view, keys, skipped)
    return folds, skipped


# ---------------------------------------------------------------------------------------------
# Factors, and the error they are judged by


def _alphas(instance, attribute, value):
    if not value or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in value):
        raise ConfigError(f"alphas={value!r} must be a non-empty tuple of numbers in [0, 1], e.g. (0.3, 0.5, 0.7)")


def _groupsize(instance, attribute, value):
    if value == "auto":
        return
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 4
                              or (value & (value - 1)) or int(math.log2(value)) % 2):
        raise ConfigError(f"convrot_groupsize={value!r} must be None (no rotation), 'auto' (the QuIP recipe's "
                          "choice per layer) or a power of 4 (16, 64, 256)")


def _min_gain(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"min_gain={value!r} must be a number in [0, 1), e.g. 0.01")


def _pos_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{attribute.name}={value!r} must be a positive int, e.g. 256")


class _MappingStats:
    """``{layer: HessianStats}`` (from :func:`cq.calibrate.capture`) seen through the Calibration interface."""

    def __init__(self, stats: Mapping[str, Any]):
        self.stats = stats

    def input_absmax(self, layer: str):
        st = self.stats.get(layer)
        return None if st is None else st.input_absmax

    def hessian(self, layer: str, *, k: int | None = None):
        st = self.stats.get(layer)
        return None if st is None else st.hessian


def _stats(value):
    if value is None or (hasattr(value, "input_absmax") and hasattr(value, "hessian")):
        return value
    if isinstance(value, Mapping):
        return _MappingStats(value)
    raise ConfigError(f"calibration must be a cq.io.calibration.Calibration or a {{layer: HessianStats}} mapping, "
                      f"got {type(value).__name__}; load one with cq.io.calibration.load_calibration(path)")


@attrs.frozen(eq=False)
class SmoothQuantConfig:
    """How :func:`smoothquant` picks and folds factors.

    ``calibration``: a loaded :class:`~cq.io.calibration.Calibration` (or ``{layer: HessianStats}``);
    per-channel ``input_absmax`` and the Hessian of every consumer are needed (layers without them
    are skipped and listed). ``alphas``: the candidates searched per mapping; ``alpha`` fixes one
    (the reference's ``smoothquant_alpha``; the gain check still applies). ``kinds``: which fold
    kinds to use. ``convrot_groupsize``: the ConvRot group the recipe stores (``None``: no rotation;
    ``"auto"``: the largest of 256, 64, 16 dividing each consumer's K, as ``--optimizer quip`` does)
    so the search sees the activations ComfyUI will quantize. ``tokens``: inputs drawn per consumer
    for the search (Gaussian with the Hessian's covariance; above ``max_covariance_k`` inputs, with its
    diagonal only, to avoid a K³ factorization); the error is estimated on a seeded subset of at most
    ``max_rows`` output rows per consumer. ``min_gain``: the least relative error drop for a
    mapping to be folded.

    Example:
        >>> SmoothQuantConfig(alpha=0.5).candidates
        (0.5,)
    """

    calibration: Any = attrs.field(default=None, converter=_stats)
    alphas: tuple[float, ...] = attrs.field(default=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), converter=tuple,
                                            validator=_alphas)
    alpha: float | None = None
    kinds: tuple[str, ...] = attrs.field(default=("modulation", "v_to_o", "gated_mlp", "norm"), converter=tuple)
    convrot_groupsize: int | str | None = attrs.field(default=None, validator=_groupsize)
    tokens: int = attrs.field(default=256, validator=_pos_int)
    max_covariance_k: int = attrs.field(default=4096, validator=_pos_int)
    max_rows: int = attrs.field(default=1024, validator=_pos_int)
    min_gain: float = attrs.field(default=0.0, validator=_min_gain)
    seed: int = 0

    def __attrs_post_init__(self):
        if self.alpha is not None:
            _alphas(self, None, (self.alpha,))
        bad = sorted(set(self.kinds) - {"modulation", "v_to_o", "gated_mlp", "norm"})
        if bad:
            raise ConfigError(f"kinds={self.kinds!r}: unknown {bad}; use 'modulation', 'v_to_o', 'gated_mlp', 'norm'")

    @property
    def candidates(self) -> tuple[float, ...]:
        return (float(self.alpha),) if self.alpha is not None else tuple(float(a) for a in self.alphas)


def fold_factors(a: torch.Tensor, wmax: torch.Tensor, alpha: float, *, normalize: bool = False) -> torch.Tensor:
    """``s_j = a_j^α / wmax_j^(1−α)`` (float64), 1 where a channel is dead or a value is not finite.

    Example:
        >>> fold_factors(torch.tensor([4.0, 0.0]), torch.tensor([1.0, 1.0]), 0.5).tolist()
        [2.0, 1.0]
    """
    a64, w64 = a.to(torch.float64), wmax.to(torch.float64)
    s = a64.clamp(min=1e-30) ** alpha / w64.clamp(min=1e-30) ** (1 - alpha)
    ok = torch.isfinite(s) & (a64 > 0) & (w64 > 0)
    s = torch.where(ok, s.clamp(1e-5, 1e5), torch.ones_like(s))
    if normalize and bool(ok.any()):
        s = s / s.max()
        s = torch.where(s < 1e-5, torch.full_like(s, 1e-5), s)
    return s


def _rotate(x: torch.Tensor, g: int | None) -> torch.Tensor:
    if g is None or x.shape[-1] % g:
        return x
    from .hadamard import regular_hadamard

    r = regular_hadamard(g, dtype=x.dtype)
    return (x.reshape(*x.shape[:-1], -1, g) @ r).reshape(x.shape)


def _quant_rows(m: torch.Tensor) -> torch.Tensor:
    """Per-row absmax int8 fake quantization (round half to even), float64."""
    s = m.abs().amax(1, keepdim=True).clamp(min=1e-30) / 127
    return torch.clamp(torch.round(m / s), -127, 127) * s


def smoothing_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, *, convrot_groupsize: int | None = None,
                    y: torch.Tensor | None = None) -> tuple[float, float]:
    """``(‖Y − Ŷ‖², ‖Y‖²)`` of ComfyUI's W8A8 forward of ``w`` on ``x`` after smoothing by ``s``.

    ``Ŷ = Q_tok(R(x/s)) · Q_row(R(W·diag(s)))ᵀ`` (``R`` the ConvRot rotation when given), ``Y = x·Wᵀ``
    (pass ``y`` to reuse it across factors).

    Example:
        >>> x, w = torch.randn(8, 16), torch.randn(4, 16)
        >>> err, sig = smoothing_error(x, w, None)
        >>> 0 < err < 1e-3 * sig
        True
    """
    dt = torch.float64 if w.numel() <= 2 ** 22 else torch.float32  # big layers: float32 resolves these errors
    x64, w64 = x.to(dt), w.to(dt)
    y = x64 @ w64.t() if y is None else y.to(dt)
    xs, ws = (x64, w64) if s is None else (x64 / s.to(dt), w64 * s.to(dt))
    xq = _quant_rows(_rotate(xs, convrot_groupsize))
    wq = _quant_rows(_rotate(ws, convrot_groupsize))
    return float(((xq @ wq.t() - y) ** 2).sum()), float((y ** 2).sum())


def _inputs(h: torch.Tensor, tokens: int, seed: int, name: str, max_k: int) -> torch.Tensor | None:
    k = h.shape[0]
    g = torch.Generator().manual_seed((seed * 1_000_003 + sum(map(ord, name))) % 2 ** 63)
    cov = h.to(torch.float64) / 2
    if k > max_k:  # a K³ factorization would dominate the search: per-channel variances only
        return torch.randn(tokens, k, generator=g, dtype=torch.float64) * cov.diagonal().clamp(min=0).sqrt()
    base = float(cov.diagonal().mean().clamp(min=1e-30))
    for jitter in (1e-9, 1e-6, 1e-3):  # a Hessian from fewer tokens than inputs is only semi-definite
        chol, info = torch.linalg.cholesky_ex(cov + torch.eye(k, dtype=torch.float64) * (jitter * base))
        if int(info) == 0:
            return torch.randn(tokens, k, generator=g, dtype=torch.float64) @ chol.t()
    return None


# ---------------------------------------------------------------------------------------------
# Edits


def _divide_rows(state: LayerState, *, cfg) -> LayerState:
    """The producer side of a fold: rows/entries ``[start, stop)`` ÷ ``s`` (``affine_one``: ``(1 + b)/s − 1``)."""
    start, stop, s, affine_one = cfg
    w = state.weight.clone()
    part = w[start:stop]
    sv = s.to(torch.float64)
    if part.ndim == 2:
        sv = sv.view(-1, 1)
    if affine_one:
        new = (part.to(torch.float64) + 1) / sv - 1
    else:
        new = part.to(torch.float64) / sv
    w[start:stop] = new.to(w.dtype)
    return record(state, "smooth_divide", None, weight=w, original=w)


def _scale_columns(state: LayerState, *, cfg) -> LayerState:
    """The consumer side of a fold: input columns ``[start, start + len(s))`` × ``s``.

    The layer's inputs are divided by ``s``, so a Hessian already attached to the state becomes
    ``diag(1/s) H diag(1/s)`` (``tr(W H Wᵀ)`` is unchanged) and ``meta["calibration"]``'s
    ``input_absmax`` / ``input_mean`` are divided by ``s``: attach calibration (``attach_data``) before
    applying the edit stages (:meth:`~cq.model.ModelEdits.apply_state`), or GPTQ/LDLQ and bias
    correction would use the unsmoothed inputs.
    """
    start, s = cfg
    stop = start + s.shape[0]
    w = state.weight.clone()
    w[:, start:stop] = (w[:, start:stop].to(torch.float64) * s.view(1, -1)).to(w.dtype)
    changes = {}
    if state.hessian is not None:
        inv = torch.ones(state.hessian.shape[0], dtype=torch.float64)
        inv[start:stop] = 1 / s
        changes["hessian"] = (state.hessian.to(torch.float64) * inv.view(-1, 1) * inv.view(1, -1)).to(
            state.hessian.dtype)
    cal = state.meta.get("calibration")
    if cal:  # per-channel input statistics are linear in x: exact under x → x/s (bias correction reads the mean)
        cal = dict(cal)
        for name in ("input_absmax", "input_mean"):
            t = cal.get(name)
            if isinstance(t, torch.Tensor) and t.shape == (state.shape[1],):
                t = t.to(torch.float64).clone()
                t[start:stop] = t[start:stop] / s
                cal[name] = t.to(torch.float32)
        changes["meta"] = {"calibration": cal}
    if state.meta.get("upstream") is not None:
        # The cross term describes the unsmoothed model's quantized prefix; after the fold the earlier
        # layers round differently, so it says nothing exact any more.
        state = record(state, "drop_upstream", None, meta={"upstream": None},
                       note="smoothquant: dropped the sequential calibration's upstream cross term of this layer "
                            "(it describes the unsmoothed model)")
    if not state.meta.get("w8a8_stats"):
        return record(state, "smooth_scale_columns", None, weight=w, original=w, **changes)
    # Per-token int8 rounding is not linear: statistics of the old inputs' round trip say nothing
    # exact about the smoothed inputs' one. Drop them rather than let w8a8_round use them.
    out = record(state, "smooth_scale_columns", None, weight=w, original=w,
                 note="smoothquant: dropped the W8A8 activation statistics of this layer (they describe the "
                      "unsmoothed inputs); recapture calibration on the smoothed model for W8A8-aware rounding",
                 **changes)
    return attrs.evolve(out, meta={k: v for k, v in out.meta.items() if k != "w8a8_stats"})


def fold_edits(fold: Fold, s: torch.Tensor) -> ModelEdits:
    """The edits of one fold with factors ``s`` (``[fold.width]``, positive): producers ÷ s, consumers × s.

    Example:
        >>> from cq.model import DictView
        >>> v = DictView({"a.attention.self.value.weight": torch.ones(2, 2),
        ...               "a.attention.output.dense.weight": torch.ones(2, 2)})
        >>> e = fold_edits(find_folds(v)[0][0], torch.tensor([2.0, 4.0], dtype=torch.float64))
        >>> e.apply("a.attention.output.dense.weight", v.tensor("a.attention.output.dense.weight")).tolist()
        [[2.0, 4.0], [2.0, 4.0]]
    """
    stages: dict[str, list] = {}
    for e in fold.producers:
        stages.setdefault(e.key, []).append(
            stage(_divide_rows, (e.start, e.stop, s, e.affine_one), name=f"smoothquant_divide[{e.start}:{e.stop}]"))
    for c in fold.consumers:
        stages.setdefault(f"{c}.weight", []).append(
            stage(_scale_columns, (fold.col_start, s), name="smoothquant_scale_columns"))
    return ModelEdits(stages=stages)


def view_numel(view: ModelView, stem: str) -> int:
    return math.prod(view.shape(f"{stem}.weight"))


def _group_for(groupsize, k: int) -> int | None:
    if groupsize != "auto":
        return groupsize if groupsize is None or k % groupsize == 0 else None
    from .convrot import AUTO_GROUPSIZES

    return next((g for g in AUTO_GROUPSIZES if k % g == 0), None)


def _search(view: ModelView, fold: Fold, cfg: SmoothQuantConfig) -> tuple[dict | None, str | None]:
    """Best α for ``fold`` (and its errors), or why it is skipped."""
    cal = cfg.calibration
    a = None
    xs, ws = [], []
    for c in fold.consumers:
        amax = cal.input_absmax(c)
        k = _in_features(view, c)
        h = cal.hessian(c, k=k) if amax is not None else None
        if amax is None or h is None:
            return None, f"no calibration statistics (input_absmax and Hessian) for {c}"
        amax = amax.to(torch.float64)[fold.col_start:fold.col_start + fold.width]
        a = amax if a is None else torch.maximum(a, amax)
        x = _inputs(h, cfg.tokens, cfg.seed, c, cfg.max_covariance_k)
        if x is None:
            return None, f"the Hessian of {c} is not positive semi-definite"
        xs.append(x)
        ws.append(view.tensor(f"{c}.weight").to(torch.float64 if view_numel(view, c) <= 2 ** 22 else torch.float32))
    wmax = torch.stack([w[:, fold.col_start:fold.col_start + fold.width].abs().amax(0) for w in ws]).amax(0)
    # The error is a sum over output rows, each quantized on its own: a seeded subset of rows
    # estimates it (the same rows for every α), at a fraction of the cost for wide layers.
    g = torch.Generator().manual_seed(cfg.seed)
    ws = [w if w.shape[0] <= cfg.max_rows else w[torch.randperm(w.shape[0], generator=g)[: cfg.max_rows]]
          for w in ws]
    ys = [x.to(w.dtype) @ w.t() for x, w in zip(xs, ws)]

    def total(s_part):
        err = sig = 0.0
        for x, w, y in zip(xs, ws, ys):
            s_full = None
            if s_part is not None:
                s_full = torch.ones(w.shape[1], dtype=torch.float64)
                s_full[fold.col_start:fold.col_start + fold.width] = s_part
            e, n2 = smoothing_error(x, w, s_full, convrot_groupsize=_group_for(cfg.convrot_groupsize, w.shape[1]),
                                    y=y)
            err, sig = err + e, sig + n2
        return math.sqrt(err / sig) if sig > 0 else 0.0

    before = total(None)
    best = None
    for alpha in cfg.candidates:
        s = fold_factors(a, wmax, alpha, normalize=fold.normalize)
        err = total(s)
        if best is None or err < best["err_after"]:
            best = {"alpha": alpha, "err_after": err, "s": s}
    if best is None or before <= 0 or best["err_after"] > before * (1 - cfg.min_gain) or best["err_after"] >= before:
        return None, (f"no alpha in {list(cfg.candidates)} lowered the consumers' W8A8 error "
                      f"({before:.4g} without smoothing)")
    best["err_before"] = before
    return best, None


def smoothquant(view: ModelView, *, cfg: SmoothQuantConfig) -> ModelEdits:
    """The model transform: fold searched SmoothQuant factors wherever a fold is exact; skip and list the rest.

    Returns :class:`~cq.model.ModelEdits` with float32 stages for every producer and consumer tensor,
    ``report["smoothquant"] = {"folded": [...], "skipped": [...]}`` and a warning naming the folded
    layers (runtime LoRAs on them no longer match).

    Example:
        >>> from cq.model import DictView
        >>> from cq.calibrate import HessianStats
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(512, 16, generator=g) * torch.logspace(-1, 1, 16)
        >>> v = DictView({"a.attention.self.value.weight": torch.randn(16, 16, generator=g),
        ...               "a.attention.output.dense.weight": torch.randn(16, 16, generator=g)})
        >>> st = {"a.attention.output.dense": HessianStats(hessian=2 / 512 * x.T @ x, input_absmax=x.abs().amax(0),
        ...                                                input_mean=x.mean(0), samples=512)}
        >>> edits = smoothquant(v, cfg=SmoothQuantConfig(calibration=st))
        >>> sorted(edits.stages)
        ['a.attention.output.dense.weight', 'a.attention.self.value.weight']
    """
    if cfg.calibration is None:
        raise ConfigError("smoothquant needs calibration data (per-channel input_absmax and Hessians): pass "
                          "SmoothQuantConfig(calibration=load_calibration(path)); without data the factors are "
                          "guesses and cq does not fold them")
    folds, skipped = find_folds(view)
    edits = ModelEdits()
    folded = []
    for fold in folds:
        if fold.kind not in cfg.kinds:
            continue
        best, why = _search(view, fold, cfg)
        if best is None:
            skipped.append({"layers": [fold.name], "reason": why})
            continue
        edits = edits | fold_edits(fold, best["s"])
        folded.append({"mapping": fold.name, "kind": fold.kind, "consumers": list(fold.consumers),
                       "producers": sorted({e.key for e in fold.producers}), "alpha": best["alpha"],
                       "w8a8_rel_before": best["err_before"], "w8a8_rel_after": best["err_after"]})
    warnings = ()
    if folded:
        touched = sorted({k for f in folded for k in f["producers"] + [f"{c}.weight" for c in f["consumers"]]})
        warnings = (f"smoothquant folded {len(folded)} mappings: the weights of {len(touched)} tensors changed "
                    f"(e.g. {touched[0]}); runtime LoRAs trained on the original model no longer match these "
                    "layers exactly",)
    return ModelEdits(stages=edits.stages, warnings=warnings,
                      report={"smoothquant": {"folded": folded, "skipped": skipped}})


SmoothQuantTransform = Callable[[ModelView], ModelEdits]
