"""Calibration from real inputs: per-layer Hessians ``H = 2/T · XᵀX`` and input channel statistics.

The accumulation is a pure fold (``hessian_init`` → ``hessian_update``\\* → ``hessian_finalize``);
:func:`capture` runs it inside forward pre-hooks on a model's ``nn.Linear`` layers while the user's
own inputs go through the model, and returns the statistics keyed by the state-dict weight stem
(the weight key without ``.weight``), ready for :func:`cq.io.calibration.save_calibration`.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    >>> stats = capture(model, [torch.randn(5, 4), torch.randn(7, 4)])
    >>> sorted(stats), stats["2"].samples, tuple(stats["0"].hessian.shape)
    (['0', '2'], 12, (4, 4))
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable, Mapping

import attrs
import torch

from .errors import ConfigError, InputError

__all__ = ["HessianAcc", "HessianStats", "hessian_init", "hessian_update", "hessian_finalize", "capture",
           "ActivationAcc", "ActivationStats", "activation_init", "activation_update", "activation_finalize",
           "activation_stats", "w8a8_groupsize"]

log = logging.getLogger(__name__)

#: Token rows per float64 product: bounds the float64 copy of the inputs (4096 × K × 8 bytes).
CHUNK_TOKENS = 4096


@attrs.frozen(eq=False)
class HessianAcc:
    """Running sums over the calibration tokens of one layer (a value: updates return a new one)."""

    sum_xx: torch.Tensor  # float64 [K, K], Σ xᵀx
    count: int  # T, tokens seen
    absmax: torch.Tensor  # float32 [K], max |x| per input channel
    sum_x: torch.Tensor  # float64 [K], Σ x

    @property
    def k(self) -> int:
        return self.sum_xx.shape[0]


@attrs.frozen(eq=False)
class HessianStats:
    """What a calibration file stores for one layer."""

    hessian: torch.Tensor  # float32 [K, K], 2/T · XᵀX (symmetric)
    input_absmax: torch.Tensor  # float32 [K], max |x| per input channel (SmoothQuant)
    input_mean: torch.Tensor  # float32 [K], mean x per input channel (bias correction)
    samples: int  # T
    #: ConvRot group size (0: unrotated) -> statistics of ComfyUI's activation path in that basis
    #: (W8A8-aware rounding); empty unless ``capture(..., w8a8=...)`` asked for them.
    w8a8: Mapping[int, "ActivationStats"] = attrs.field(factory=dict)
    #: float32 [K, K] ``2/T · (X − X̃)ᵀX̃``: float-model inputs against the inputs of the model with its
    #: earlier layers quantized (``H`` then comes from ``X̃``); only from :func:`cq.sequential.capture_sequential`.
    upstream: torch.Tensor | None = None


def hessian_init(k: int, *, device: torch.device | str = "cpu") -> HessianAcc:
    """An empty accumulator for a layer with ``k`` inputs.

    Example:
        >>> hessian_init(3).count, hessian_init(3).sum_xx.dtype
        (0, torch.float64)
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ConfigError(f"hessian_init needs the layer's in_features as a positive int, got {k!r}")
    return HessianAcc(sum_xx=torch.zeros(k, k, dtype=torch.float64, device=device), count=0,
                      absmax=torch.zeros(k, dtype=torch.float32, device=device),
                      sum_x=torch.zeros(k, dtype=torch.float64, device=device))


def _rows(x: torch.Tensor, k: int, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{where}: calibration inputs must be float tensors, got {kind}")
    if x.ndim == 0 or x.shape[-1] != k:
        raise InputError(f"{where}: input of shape {tuple(x.shape)} does not end in in_features={k}; "
                         "pass activations shaped [..., in_features]")
    return x.detach().reshape(-1, k)


def _accumulate_(sum_xx: torch.Tensor, sum_x: torch.Tensor, absmax: torch.Tensor, x2: torch.Tensor, *,
                 chunk: int, matmul_dtype: torch.dtype, where: str) -> None:
    """Add the rows ``x2`` [T, K] into the given sums in place (the caller owns them)."""
    if not bool(torch.isfinite(x2).all()):
        bad = int((~torch.isfinite(x2)).sum())
        raise InputError(f"{where}: {bad} NaN/Inf values in the layer's inputs; run the model in a dtype "
                         "that does not overflow (e.g. float32/bfloat16) or drop the offending inputs")
    dev = sum_xx.device
    for start in range(0, x2.shape[0], chunk):
        xc = x2[start:start + chunk]
        xm = xc.to(matmul_dtype)
        sum_xx.add_((xm.t() @ xm).to(device=dev, dtype=torch.float64))
        sum_x.add_(xc.sum(dim=0, dtype=torch.float64).to(dev))
        torch.maximum(absmax, xc.abs().amax(dim=0).to(device=dev, dtype=torch.float32), out=absmax)


def hessian_update(acc: HessianAcc, x: torch.Tensor, *, chunk: int = CHUNK_TOKENS,
                   matmul_dtype: torch.dtype = torch.float64) -> HessianAcc:
    """A new accumulator with the tokens of ``x`` ([..., K], any float dtype) added.

    Products are taken ``chunk`` token rows at a time in ``matmul_dtype`` (float64 by default; float32
    is ~3× faster on CPU and far faster on consumer GPUs, with sums still kept in float64) on the
    device of ``x``, and added on the accumulator's device. ``acc`` is not modified.

    Example:
        >>> acc = hessian_update(hessian_init(2), torch.tensor([[1.0, 2.0], [3.0, -4.0]]))
        >>> acc.count, acc.sum_xx.tolist(), acc.absmax.tolist()
        (2, [[10.0, -10.0], [-10.0, 20.0]], [3.0, 4.0])
    """
    x2 = _rows(x, acc.k, "hessian_update")
    sum_xx, sum_x, absmax = acc.sum_xx.clone(), acc.sum_x.clone(), acc.absmax.clone()
    _accumulate_(sum_xx, sum_x, absmax, x2, chunk=chunk, matmul_dtype=matmul_dtype, where="hessian_update")
    return HessianAcc(sum_xx=sum_xx, count=acc.count + x2.shape[0], absmax=absmax, sum_x=sum_x)


def hessian_finalize(acc: HessianAcc) -> HessianStats:
    """``H = 2/T · Σxᵀx`` (float32, exactly symmetric), channel absmax and mean, ``T``.

    Example:
        >>> st = hessian_finalize(hessian_update(hessian_init(2), torch.tensor([[1.0, 2.0], [3.0, -4.0]])))
        >>> st.hessian.tolist(), st.input_mean.tolist(), st.samples
        ([[10.0, -10.0], [-10.0, 20.0]], [2.0, -1.0], 2)
    """
    if acc.count <= 0:
        raise InputError("hessian_finalize: no calibration tokens were accumulated; "
                         "run inputs through the layer (hessian_update) before finalizing")
    h = acc.sum_xx * (2.0 / acc.count)
    h = (h + h.t()) * 0.5
    return HessianStats(hessian=h.to(torch.float32).cpu(), input_absmax=acc.absmax.cpu(),
                        input_mean=(acc.sum_x / acc.count).to(torch.float32).cpu(), samples=acc.count)


# ---------------------------------------------------------------------------------------------
# Statistics of ComfyUI's W8A8 activation path (for W8A8-aware rounding and bias correction).


@attrs.frozen(eq=False)
class ActivationStats:
    """Statistics of the runtime's activation path of one layer, in one working basis.

    Second moments are normalised like the Hessian (``2/T · Σ``) so that they add to it.
    ``groupsize``: the ConvRot group size of the basis (0: unrotated). ``x_w = x·R`` are the
    working-basis inputs, ``x̃`` their per-token int8 round trip (absmax/127, round half to even,
    as comfy-kitchen does), ``e = x̃ − x_w``.

    Example:
        >>> st = activation_stats(torch.randn(64, 16), groupsize=16)
        >>> st.groupsize, tuple(st.hessian.shape), st.samples
        (16, (16, 16), 64)
    """

    groupsize: int
    hessian: torch.Tensor | None  # float32 [K, K] 2/T X̃ᵀX̃ (None when loaded from a file)
    cross: torch.Tensor | None  # float32 [K, K] 2/T X̃ᵀX_w, row index x̃ (None when loaded from a file)
    err_sq: torch.Tensor  # float32 [K] 2/T Σ e²
    err_x: torch.Tensor  # float32 [K] 2/T Σ e·x_w
    err_mean: torch.Tensor  # float32 [K] mean e
    samples: int

    @property
    def k(self) -> int:
        return self.err_sq.shape[0]


@attrs.frozen(eq=False)
class ActivationAcc:
    """Running float64 sums for :class:`ActivationStats` (a value: updates return a new one)."""

    groupsize: int
    sum_qq: torch.Tensor  # [K, K] Σ x̃ᵀx̃
    sum_qx: torch.Tensor  # [K, K] Σ x̃ᵀx_w
    sum_ee: torch.Tensor  # [K] Σ e²
    sum_ex: torch.Tensor  # [K] Σ e·x_w
    sum_e: torch.Tensor  # [K] Σ e
    count: int


def w8a8_groupsize(k: int, spec: int | str | None) -> int | None:
    """The basis (ConvRot group size, 0 = unrotated) that ``spec`` means for a layer with ``k`` inputs.

    ``"auto"`` is what :func:`cq.transforms.convrot.convrot` picks by default (256, 64 or 16, or
    unrotated when K is not a multiple of 16); ``None``/``"none"``/0 is unrotated; an int is that
    group size, or ``None`` (skip) when it does not divide ``k``.

    Example:
        >>> w8a8_groupsize(384, "auto"), w8a8_groupsize(320, "auto"), w8a8_groupsize(24, "auto"), w8a8_groupsize(384, 0)
        (64, 64, 0, 0)
    """
    from .transforms.convrot import AUTO_GROUPSIZES

    if spec is None or spec == "none" or spec == 0:
        return 0
    if spec == "auto":
        return next((g for g in AUTO_GROUPSIZES if k % g == 0), 0)
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 16 or spec & (spec - 1):
        raise ConfigError(f"w8a8 basis {spec!r} must be 'auto', 'none'/0 or a ConvRot group size (16, 64, 256, ...)")
    return spec if k % spec == 0 else None


def activation_init(k: int, groupsize: int = 0, *, device: torch.device | str = "cpu") -> ActivationAcc:
    """An empty accumulator for a layer with ``k`` inputs in the ConvRot basis ``groupsize`` (0: none).

    Example:
        >>> activation_init(16, 16).count
        0
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ConfigError(f"activation_init needs the layer's in_features as a positive int, got {k!r}")
    if groupsize and k % groupsize:
        raise ConfigError(f"activation_init: ConvRot groupsize {groupsize} does not divide in_features={k}")
    z2 = torch.zeros(k, k, dtype=torch.float64, device=device)
    z1 = torch.zeros(k, dtype=torch.float64, device=device)
    return ActivationAcc(groupsize=groupsize, sum_qq=z2, sum_qx=z2.clone(), sum_ee=z1, sum_ex=z1.clone(),
                         sum_e=z1.clone(), count=0)


def _activation_accumulate_(acc: ActivationAcc, x2: torch.Tensor, chunk: int) -> None:
    from .kernels import quantize_activations_ref

    rot = None
    if acc.groupsize:
        from .transforms.convrot import ConvRot

        rot = ConvRot(acc.groupsize)
    dev = acc.sum_qq.device
    for start in range(0, x2.shape[0], chunk):
        xc = x2[start:start + chunk].to(torch.float32)
        xw = rot.activations(xc) if rot is not None else xc  # the runtime rotates in float32
        q, sx = quantize_activations_ref(xw)
        xq = q.to(torch.float32) * sx
        xw64, xq64 = xw.to(torch.float64), xq.to(torch.float64)
        e = xq64 - xw64
        acc.sum_qq.add_((xq64.t() @ xq64).to(dev))
        acc.sum_qx.add_((xq64.t() @ xw64).to(dev))
        acc.sum_ee.add_((e * e).sum(0).to(dev))
        acc.sum_ex.add_((e * xw64).sum(0).to(dev))
        acc.sum_e.add_(e.sum(0).to(dev))


def activation_update(acc: ActivationAcc, x: torch.Tensor, *, chunk: int = CHUNK_TOKENS) -> ActivationAcc:
    """A new accumulator with the original-basis input rows ``x`` ([..., K]) added.

    Example:
        >>> activation_update(activation_init(16), torch.randn(5, 16)).count
        5
    """
    k = acc.sum_qq.shape[0]
    x2 = _rows(x, k, "activation_update")
    new = attrs.evolve(acc, sum_qq=acc.sum_qq.clone(), sum_qx=acc.sum_qx.clone(), sum_ee=acc.sum_ee.clone(),
                       sum_ex=acc.sum_ex.clone(), sum_e=acc.sum_e.clone())
    _activation_accumulate_(new, x2, chunk)
    return attrs.evolve(new, count=acc.count + x2.shape[0])


def activation_finalize(acc: ActivationAcc) -> ActivationStats:
    """Normalise the sums (``2/T`` for second moments, ``1/T`` for the mean error), float32.

    Example:
        >>> st = activation_finalize(activation_update(activation_init(16), torch.randn(8, 16)))
        >>> st.samples, bool((st.err_sq >= 0).all())
        (8, True)
    """
    if acc.count <= 0:
        raise InputError("activation_finalize: no tokens were accumulated; call activation_update first")
    c = 2.0 / acc.count
    hq = acc.sum_qq * c
    return ActivationStats(groupsize=acc.groupsize, hessian=((hq + hq.t()) * 0.5).to(torch.float32).cpu(),
                           cross=(acc.sum_qx * c).to(torch.float32).cpu(),
                           err_sq=(acc.sum_ee * c).to(torch.float32).cpu(),
                           err_x=(acc.sum_ex * c).to(torch.float32).cpu(),
                           err_mean=(acc.sum_e / acc.count).to(torch.float32).cpu(), samples=acc.count)


def activation_stats(x: torch.Tensor, *, groupsize: int = 0) -> ActivationStats:
    """:class:`ActivationStats` of the input rows ``x`` [..., K] in one call (init, update, finalize)."""
    return activation_finalize(activation_update(activation_init(x.shape[-1], groupsize), x))


# ---------------------------------------------------------------------------------------------


def _key_fn(name_map: str | Callable[[str], str | None] | None) -> Callable[[str], str | None]:
    if name_map is None:
        return lambda name: name
    if isinstance(name_map, str):
        return lambda name: name_map + name
    if callable(name_map):
        return name_map
    raise ConfigError(f"name_map must be None, a prefix str or a callable(name) -> key | None, "
                      f"got {type(name_map).__name__}")


def _select(module: torch.nn.Module, layers) -> list[tuple[str, torch.nn.Linear]]:
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    if layers is None:
        return linears
    if callable(layers):
        return [(n, m) for n, m in linears if layers(n, m)]
    if isinstance(layers, str):
        layers = [layers]
    wanted = list(layers)
    by_name = dict(linears)
    missing = [n for n in wanted if n not in by_name]
    if missing:
        some = ", ".join(list(by_name)[:8]) or "none"
        raise InputError(f"capture: layers {missing} are not nn.Linear modules of the model; "
                         f"Linear module names look like: {some}")
    return [(n, by_name[n]) for n in wanted]


def _call(module: torch.nn.Module, item: Any, forward) -> None:
    if forward is not None:
        forward(module, item)
    elif isinstance(item, Mapping):
        module(**item)
    elif isinstance(item, tuple):
        module(*item)
    else:
        module(item)


def _mask_rows(x2: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # Padding positions of a batch are computed but never used: keep them out of the statistics.
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        return x2[mask.reshape(-1).to(device=x2.device, dtype=torch.bool)]
    return x2


def _check_capture_options(max_tokens: int | None, token_mask: str | None) -> None:
    """The options :func:`capture` and :func:`cq.sequential.capture_sequential` share, checked before any pass."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens <= 0):
        raise ConfigError(f"max_tokens={max_tokens!r} must be a positive int or None")
    if token_mask is not None and not isinstance(token_mask, str):
        raise ConfigError(f"token_mask={token_mask!r} must be the name of a mask entry of the inputs "
                          "(e.g. 'attention_mask') or None")


def _item_mask(item: Any, token_mask: str | None, where: str) -> torch.Tensor | None:
    if token_mask is None:
        return None
    if not isinstance(item, Mapping) or token_mask not in item:
        raise InputError(f"{where}: token_mask={token_mask!r} but an input has no such entry "
                         f"(got {type(item).__name__}); pass mappings such as tokenizer batches")
    return torch.as_tensor(item[token_mask]).bool()


def capture(module: torch.nn.Module, inputs: Iterable[Any], *,
            forward: Callable[[torch.nn.Module, Any], Any] | None = None,
            layers: Iterable[str] | Callable[[str, torch.nn.Module], bool] | None = None,
            name_map: str | Callable[[str], str | None] | None = None,
            max_tokens: int | None = None, device: torch.device | str = "cpu",
            matmul_dtype: torch.dtype = torch.float64,
            w8a8: Iterable[int | str | None] | None = None,
            token_mask: str | None = None) -> dict[str, HessianStats]:
    """Run ``inputs`` through ``module`` and return per-layer Hessians and input statistics.

    Args:
        module: any ``torch.nn.Module``; forward pre-hooks go on its ``nn.Linear`` layers (all of
            them, or those ``layers`` names / accepts) and are removed afterwards, even on error.
            Put it in ``eval()`` mode first (dropout or batch-norm in training mode triggers a warning).
        inputs: the user's real inputs; each item is passed as ``forward(module, item)`` if given,
            else ``module(**item)`` for a mapping (e.g. a tokenizer batch), ``module(*item)`` for a
            tuple, ``module(item)`` otherwise. Runs under ``torch.no_grad()``.
        layers: Linear module names (as in ``named_modules()``) or a predicate ``(name, module)``.
        name_map: turns a module name into the result key: a prefix string (e.g.
            ``"model.diffusion_model."``) or a callable returning the key, or ``None`` to skip.
            Keys are weight stems: the state-dict weight key without ``.weight``.
        max_tokens: stop accumulating a layer after this many token rows (and stop iterating once
            every layer is full).
        device: where the accumulators live (one float64 ``[K, K]`` per layer; the products are
            computed on the inputs' device).
        matmul_dtype: dtype of the chunked ``xᵀx`` products (float64 default; see :func:`hessian_update`).
        token_mask: for mapping items (tokenizer batches), the key of a ``[B, L]`` mask such as
            ``"attention_mask"``: rows of a ``[B, L, K]`` layer input at masked-out (padding) positions are
            left out of the statistics; inputs of other shapes (a pooler's ``[B, K]``) are taken whole.
        w8a8: bases in which to also gather :class:`ActivationStats` of ComfyUI's W8A8 activation path
            (for :func:`cq.transforms.w8a8_round.w8a8_round`): ``"auto"`` (the ConvRot basis the QuIP
            recipe uses), ``"none"`` (unrotated, for GPTQ) or ConvRot group sizes. Each basis adds two
            ``[K, K]`` float64 accumulators per layer and about twice the capture time.

    Returns:
        ``{weight_stem: HessianStats}`` for every selected layer that saw at least one token.
    """
    _check_capture_options(max_tokens, token_mask)
    key_of = _key_fn(name_map)
    selected = []
    for name, mod in _select(module, layers):
        key = key_of(name)
        if key is not None:
            selected.append((name, key, mod))
    keys = [key for _, key, _ in selected]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ConfigError(f"capture: name_map gives several layers the same key {dupes}; make it one-to-one")
    stochastic = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)
    if any(m.training and isinstance(m, stochastic) for m in module.modules()):
        warnings.warn("capture: the module is in training mode (dropout/batch-norm statistics are active); "
                      "call module.eval() first", stacklevel=2)
    state: dict[str, dict[str, Any]] = {}
    w8a8_specs = [] if w8a8 is None else ([w8a8] if isinstance(w8a8, (str, int)) else list(w8a8))
    for spec in w8a8_specs:
        w8a8_groupsize(64, spec)  # validates the spelling before any forward pass

    current: dict[str, Any] = {}

    def make_hook(key: str, k: int):
        groupsizes = sorted({g for g in (w8a8_groupsize(k, spec) for spec in w8a8_specs) if g is not None})

        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if x is None:
                return None
            st = state.get(key)
            if st is None:
                st = state[key] = {"acc": hessian_init(k, device=device), "count": 0,
                                   "act": {g: activation_init(k, g, device=device) for g in groupsizes}}
            x2 = _mask_rows(_rows(x, k, f"capture: layer {key!r}"), x, current.get("mask"))
            if max_tokens is not None:
                x2 = x2[: max(max_tokens - st["count"], 0)]
            if x2.shape[0]:
                acc = st["acc"]
                _accumulate_(acc.sum_xx, acc.sum_x, acc.absmax, x2, chunk=CHUNK_TOKENS,
                             matmul_dtype=matmul_dtype, where=f"capture: layer {key!r}")
                for act in st["act"].values():
                    _activation_accumulate_(act, x2, CHUNK_TOKENS)
                st["count"] += x2.shape[0]
            return None

        return hook

    handles = []
    try:
        for _, key, mod in selected:
            handles.append(mod.register_forward_pre_hook(make_hook(key, mod.in_features), with_kwargs=True))
        with torch.no_grad():
            for item in inputs:
                current["mask"] = _item_mask(item, token_mask, "capture")
                _call(module, item, forward)
                if max_tokens is not None and len(state) == len(selected) and all(
                        s["count"] >= max_tokens for s in state.values()):
                    break
    finally:
        for handle in handles:
            handle.remove()
    never = [key for key in keys if key not in state or state[key]["count"] == 0]
    if never:
        log.info("capture: %d selected layer(s) never received inputs: %s", len(never), never[:8])
    out = {}
    for key in keys:
        st = state.get(key)
        if st is None or st["count"] == 0:
            continue
        acc = st["acc"]
        stats = hessian_finalize(HessianAcc(sum_xx=acc.sum_xx, count=st["count"], absmax=acc.absmax,
                                            sum_x=acc.sum_x))
        if st["act"]:
            w8 = {g: activation_finalize(attrs.evolve(a, count=st["count"])) for g, a in st["act"].items()}
            stats = attrs.evolve(stats, w8a8=w8)
        out[key] = stats
    return out
