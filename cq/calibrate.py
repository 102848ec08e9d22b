"""Calibration from real inputs: per-layer Hessians ``H = 2/T · XᵀX`` and input channel statistics.

The accumulation is a pure fold (``hessian_init`` → ``hessian_update``\\* → ``hessian_finalize``);
:func:`capture` runs it inside forward pre-hooks on a model's ``nn.Linear`` layers while the user's
own inputs go through the model, and returns the statistics keyed by the state-dict weight stem
(the weight key without ``.weight``), ready for :func:`cq.calibration_file.save_calibration`.

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

__all__ = ["HessianAcc", "HessianStats", "hessian_init", "hessian_update", "hessian_finalize", "capture"]

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


def capture(module: torch.nn.Module, inputs: Iterable[Any], *,
            forward: Callable[[torch.nn.Module, Any], Any] | None = None,
            layers: Iterable[str] | Callable[[str, torch.nn.Module], bool] | None = None,
            name_map: str | Callable[[str], str | None] | None = None,
            max_tokens: int | None = None, device: torch.device | str = "cpu",
            matmul_dtype: torch.dtype = torch.float64) -> dict[str, HessianStats]:
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

    Returns:
        ``{weight_stem: HessianStats}`` for every selected layer that saw at least one token.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens <= 0):
        raise ConfigError(f"max_tokens={max_tokens!r} must be a positive int or None")
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

    def make_hook(key: str, k: int):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if x is None:
                return None
            st = state.get(key)
            if st is None:
                st = state[key] = {"acc": hessian_init(k, device=device), "count": 0}
            x2 = _rows(x, k, f"capture: layer {key!r}")
            if max_tokens is not None:
                x2 = x2[: max(max_tokens - st["count"], 0)]
            if x2.shape[0]:
                acc = st["acc"]
                _accumulate_(acc.sum_xx, acc.sum_x, acc.absmax, x2, chunk=CHUNK_TOKENS,
                             matmul_dtype=matmul_dtype, where=f"capture: layer {key!r}")
                st["count"] += x2.shape[0]
            return None

        return hook

    handles = []
    try:
        for _, key, mod in selected:
            handles.append(mod.register_forward_pre_hook(make_hook(key, mod.in_features), with_kwargs=True))
        with torch.no_grad():
            for item in inputs:
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
        out[key] = hessian_finalize(HessianAcc(sum_xx=acc.sum_xx, count=st["count"], absmax=acc.absmax,
                                               sum_x=acc.sum_x))
    return out
