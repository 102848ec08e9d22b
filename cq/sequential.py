"""Sequential calibration: each layer's statistics come from the model with its earlier layers quantized.

:func:`capture_sequential` walks the model's ``nn.Linear`` layers in the order the forward pass first
calls them. Layers that receive the same input tensor (``q``/``k``/``v``) form one group. For each
group it runs the calibration inputs through the float model and through the same model with
every earlier group already quantized (weight-only, with the recipe you will convert with), and
pairs the rows token by token:

* ``H = 2/T · X̃ᵀX̃`` from the inputs the quantized model gives the layer (``<L>.hessian``), with the
  channel absmax / mean of those inputs;
* ``D = 2/T · (X − X̃)ᵀX̃``, the cross term of the float model's inputs ``X`` against them
  (``<L>.upstream``), which :func:`cq.transforms.upstream.upstream_correct` turns into the
  GPTAQ-style target ``W + W·D·H⁻¹`` (each layer cancels what the earlier ones got wrong).

Then it quantizes the group with those statistics and moves on. The result saves with
:func:`cq.io.calibration.save_calibration` like :func:`cq.calibrate.capture`'s; files with an
``upstream`` entry are used by ``--optimizer gptq`` and ``--optimizer quip`` automatically.

Cost: two forward passes over the calibration inputs per group (``q``/``k``/``v`` count once), each
stopped right after the group's last call (``early_exit``: the later layers' work is skipped), and
the rounded weights of the layers done so far (up to one more copy of the Linear weights). The
quantized passes run the user's own module with those weights swapped in for the pass and swapped
back after it (also on error), so a ``forward`` that closes over the module still sees them. Pass the recipe you will convert with: the earlier
layers' rounding is part of what the statistics describe.

Example:
    >>> import torch
    >>> from cq.recipes import GPTQ
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    >>> stats = capture_sequential(model, [torch.randn(32, 8) for _ in range(4)], quantize=GPTQ())
    >>> sorted(stats), stats["2"].samples, float(stats["0"].upstream.abs().max())  # nothing before layer 0
    (['0', '2'], 128, 0.0)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterable, Mapping

import attrs
import torch

from .calibrate import (CHUNK_TOKENS, HessianAcc, HessianStats, _accumulate_, _call, _check_capture_options,
                        _item_mask, _key_fn, _mask_rows, _rows, _select, hessian_finalize, hessian_init)
from .errors import ConfigError, InputError
from .state import LayerState

__all__ = ["capture_sequential"]

log = logging.getLogger(__name__)


class _Group:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.first_input: torch.Tensor | None = None


def _quantizer(quantize) -> Callable[[LayerState], LayerState]:
    from .pipeline import Pipeline
    from .recipes import recipe_info, recipe_pipeline

    if isinstance(quantize, Pipeline):
        return quantize
    try:
        recipe_info(quantize)
    except ConfigError:
        if callable(quantize):
            return quantize
        raise ConfigError(f"quantize={quantize!r} must be a recipe record (e.g. cq.recipes.QuIP()), a Pipeline or a "
                          "callable(LayerState) -> LayerState") from None
    return recipe_pipeline(quantize)


@contextlib.contextmanager
def _swapped(mods: Mapping[str, torch.nn.Module], weights: Mapping[str, torch.Tensor]):
    # A pointer swap, not a copy: the parameter objects stay the user's, only their storage changes
    # for the duration of one forward pass.
    saved = {n: mods[n].weight.data for n in weights}
    try:
        for n, w in weights.items():
            mods[n].weight.data = w
        yield
    finally:
        for n, w in saved.items():
            mods[n].weight.data = w


class _Stop(BaseException):
    # BaseException, not Exception: a user's forward that catches Exception must not swallow the early exit.
    pass


def _order(ref: torch.nn.Module, selected, item, forward) -> tuple[list[list[str]], list[str]]:
    """Layer groups in first-call order (a group shares one input tensor), and every call in order.

    One forward pass on ``item`` finds both; the call sequence tells each group's passes where they may
    stop (:class:`_Early`).
    """
    groups: list[_Group] = []
    seen: set[str] = set()
    calls: list[str] = []

    def make(name):
        def hook(mod, args, kwargs):
            calls.append(name)
            x = args[0] if args else kwargs.get("input")
            if name in seen or x is None:
                return None
            seen.add(name)
            if groups and groups[-1].first_input is x:
                groups[-1].names.append(name)
            else:
                g = _Group()
                g.names.append(name)
                g.first_input = x
                groups.append(g)
            return None
        return hook

    handles = [mod.register_forward_pre_hook(make(name), with_kwargs=True) for name, mod in selected]
    try:
        with torch.no_grad():
            _call(ref, item, forward)
    finally:
        for h in handles:
            h.remove()
    return [g.names for g in groups], calls


class _Early:
    """Stops a pass at the first Linear call after the group's last one, while the calls match the plan.

    The plan is the call sequence of the first input. A pass that calls the Linears in another order
    (an input whose structure differs) stops following it and runs to the end, so no call of the group
    is ever cut off on an input the plan does not describe.
    """

    def __init__(self, calls: list[str], names: list[str]):
        last = max((i for i, n in enumerate(calls) if n in names), default=len(calls))
        self.calls = calls
        self.stop = last + 1 if last + 1 < len(calls) else None
        self.at = 0
        self.on_plan = True

    def reset(self) -> None:
        self.at, self.on_plan = 0, True

    def hook(self, name):
        def pre(mod, args, kwargs):
            if self.on_plan:
                if self.at >= len(self.calls) or self.calls[self.at] != name:
                    self.on_plan = False
                elif self.at == self.stop:
                    raise _Stop
            self.at += 1
            return None
        return pre


def capture_sequential(module: torch.nn.Module, inputs: Iterable[Any], *, quantize,
                       forward: Callable[[torch.nn.Module, Any], Any] | None = None,
                       layers: Iterable[str] | Callable[[str, torch.nn.Module], bool] | None = None,
                       name_map: str | Callable[[str], str | None] | None = None,
                       token_mask: str | None = None, max_tokens: int | None = None,
                       matmul_dtype: torch.dtype = torch.float64, early_exit: bool = True) -> dict[str, HessianStats]:
    """Per-layer statistics of the partly quantized model, with the upstream cross term (see the module doc).

    Args:
        module: the float model (``eval()`` mode); it is not modified: the rounded weights of the layers
            done so far are swapped in only for the quantized passes.
        inputs: calibration items, iterated many times (a list is kept internally); each is passed
            as in :func:`cq.calibrate.capture` (``forward(module, item)``, ``module(**item)``, ...).
        quantize: how the earlier layers are rounded: a recipe record (``GPTQ()``, ``QuIP()``), a
            :class:`~cq.pipeline.Pipeline` or any ``LayerState -> LayerState``. It receives the layer's
            weight with its statistics attached (``attach_data`` → ``check_hessian`` first), exactly as
            the file runner gives them.
        layers, name_map, max_tokens, matmul_dtype: as in :func:`cq.calibrate.capture`.
        token_mask: for mapping items, the key of a ``[B, L]`` mask (e.g. ``"attention_mask"``): rows of
            a ``[B, L, K]`` layer input where the mask is 0 (padding) are left out. Inputs of other
            shapes (a pooler's ``[B, K]``) are taken whole.
        early_exit: end each pass at the first Linear call after the group's last one (on average half
            the forward work), following the call sequence of the first input; an input whose Linears
            run in another order is run to the end. ``False`` runs every pass whole (same statistics).

    Returns:
        ``{weight_stem: HessianStats}`` with ``upstream`` set, for every selected layer that ran.
    """
    from .transforms.attach import LayerData, attach_data
    from .transforms.hessian_check import check_hessian
    from .transforms.rounding import reconstruct

    _check_capture_options(max_tokens, token_mask)
    if not isinstance(early_exit, bool):
        raise ConfigError(f"early_exit={early_exit!r} must be True or False")
    run = _quantizer(quantize)
    key_of = _key_fn(name_map)
    items = list(inputs)
    if not items:
        raise InputError("capture_sequential: no calibration inputs; pass a non-empty list")
    ref = module
    selected = [(n, key_of(n), m) for n, m in _select(ref, layers)]
    selected = [(n, k, m) for n, k, m in selected if k is not None]
    keys = [k for _, k, _ in selected]
    if len(set(keys)) != len(keys):
        raise ConfigError("capture_sequential: name_map gives several layers the same key; make it one-to-one")
    qweights: dict[str, torch.Tensor] = {}
    groups, calls = _order(ref, [(n, m) for n, _, m in selected], items[0], forward)
    key_by_name = {n: k for n, k, _ in selected}
    ref_by_name = {n: m for n, _, m in selected}
    never = [n for n, _, _ in selected if not any(n in g for g in groups)]
    if never:
        log.info("capture_sequential: %d selected layer(s) never ran on the first input: %s", len(never), never[:8])
    out: dict[str, HessianStats] = {}
    for names in groups:
        acc = {n: hessian_init(ref_by_name[n].in_features) for n in names}
        cross = {n: torch.zeros(ref_by_name[n].in_features, ref_by_name[n].in_features, dtype=torch.float64)
                 for n in names}
        count = dict.fromkeys(names, 0)
        early = _Early(calls, names) if early_exit else None
        if early is not None and early.stop is None:
            early = None  # the group's layers run last: nothing to skip
        for item in items:
            mask = _item_mask(item, token_mask, "capture_sequential")
            rows = {}
            for side in ("float", "quantized"):
                got = {n: [] for n in names}

                def make(name, got=got):
                    def hook(mod, args, kwargs):
                        x = args[0] if args else kwargs.get("input")
                        if x is not None:
                            where = f"capture_sequential: layer {key_by_name[name]!r}"
                            got[name].append(_mask_rows(_rows(x, mod.in_features, where), x, mask))
                        return None
                    return hook

                handles = [ref_by_name[n].register_forward_pre_hook(make(n), with_kwargs=True) for n in names]
                if early is not None:
                    early.reset()
                    # registered after the capturing hooks: a stop never pre-empts a capture
                    handles += [m.register_forward_pre_hook(early.hook(n), with_kwargs=True) for n, _, m in selected]
                try:
                    with torch.no_grad(), _swapped(ref_by_name, qweights if side == "quantized" else {}):
                        _call(ref, item, forward)
                except _Stop:
                    pass
                finally:
                    for h in handles:
                        h.remove()
                rows[side] = {n: torch.cat(v) if v else None for n, v in got.items()}
            for n in names:
                xf, xq = rows["float"][n], rows["quantized"][n]
                if xf is None or xq is None:
                    continue
                if xf.shape != xq.shape:
                    raise InputError(f"capture_sequential: layer {key_by_name[n]!r} saw {tuple(xf.shape)} rows in the "
                                     f"float model but {tuple(xq.shape)} in the quantized one; the forward pass must "
                                     "not depend on the weights' values (no data-dependent control flow)")
                if max_tokens is not None:
                    take = max(max_tokens - count[n], 0)
                    xf, xq = xf[:take], xq[:take]
                if not xq.shape[0]:
                    continue
                a = acc[n]
                where = f"capture_sequential: layer {key_by_name[n]!r}"
                _accumulate_(a.sum_xx, a.sum_x, a.absmax, xq, chunk=CHUNK_TOKENS, matmul_dtype=matmul_dtype,
                             where=where)
                for start in range(0, xq.shape[0], CHUNK_TOKENS):
                    q = xq[start:start + CHUNK_TOKENS].to(matmul_dtype)
                    e = xf[start:start + CHUNK_TOKENS].to(matmul_dtype) - q
                    cross[n].add_((e.t() @ q).to(torch.float64))
                count[n] += xq.shape[0]
        for n in names:
            if count[n] == 0:
                continue
            a = acc[n]
            stats = hessian_finalize(HessianAcc(sum_xx=a.sum_xx, count=count[n], absmax=a.absmax, sum_x=a.sum_x))
            d = (cross[n] * (2.0 / count[n])).to(torch.float32)
            stats = attrs.evolve(stats, upstream=d)
            out[key_by_name[n]] = stats
            lin = ref_by_name[n]
            w = lin.weight.detach()
            state = LayerState.from_weight(key_by_name[n], w.to(torch.float32),
                                           bias=None if lin.bias is None else lin.bias.detach().to(torch.float32))
            data = LayerData(hessian=stats.hessian, upstream=d,
                             stats={"input_absmax": stats.input_absmax, "input_mean": stats.input_mean,
                                    "samples": stats.samples})
            q = run(check_hessian(attach_data(state, cfg=data)))
            if q.codes is None:
                raise ConfigError(f"capture_sequential: quantize={quantize!r} left {key_by_name[n]!r} unquantized "
                                  "(no codes); pass an INT8 recipe such as GPTQ() or QuIP()")
            qweights[n] = reconstruct(q).to(device=w.device, dtype=w.dtype)
    return out
