"""Data-parallel calibration capture: each rank feeds its share of the inputs, statistics all-reduced in float64.

Run the same script on every rank (``torchrun --nproc-per-node N capture.py``) with
:func:`capture_distributed` in place of :func:`cq.calibrate.capture`: rank ``r`` runs the inputs
``r, r + N, r + 2N, …`` and every rank gets the statistics of all the inputs. Sums are exchanged in
float64 (``Σxᵀx``, ``Σx``, token counts, and the W8A8 activation-path sums), channel maxima with a
MAX reduction. With one process (no process group) these functions are the identity.

Example (one process; under torchrun the same call reduces across ranks):
    >>> import torch
    >>> from cq.calibrate import capture
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    >>> xs = [torch.randn(5, 4), torch.randn(7, 4)]
    >>> a, b = capture_distributed(model, xs), capture(model, xs)
    >>> a["0"].samples, torch.equal(a["0"].hessian, b["0"].hessian)
    (12, True)
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping

import torch

from .calibrate import ActivationStats, HessianAcc, HessianStats, capture
from .errors import InputError

__all__ = ["all_reduce_acc", "all_reduce_stats", "capture_distributed", "rank_and_world"]


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world size)`` of ``group`` (default: the initialized default group), else ``(0, 1)``.

    Example:
        >>> rank_and_world()
        (0, 1)
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op: str, group: Any) -> torch.Tensor:
    import torch.distributed as dist

    out = t.detach().to("cpu").clone()  # gloo reduces CPU tensors; the statistics are small
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return out.to(t.device)


def all_reduce_acc(acc: HessianAcc, group: Any = None) -> HessianAcc:
    """One layer's accumulator summed over the ranks (float64 sums, token counts; max of channel maxima).

    Exact up to the order of float64 additions: finalizing the result equals a single process that
    saw every rank's tokens to within float64 rounding.

    Example:
        >>> from cq.calibrate import hessian_init, hessian_update
        >>> acc = hessian_update(hessian_init(2), torch.tensor([[1.0, 2.0]]))
        >>> all_reduce_acc(acc).count  # one process: unchanged
        1
    """
    if rank_and_world(group)[1] == 1:
        return acc
    flat = torch.cat([acc.sum_xx.reshape(-1).double().cpu(), acc.sum_x.double().cpu(),
                      torch.tensor([float(acc.count)], dtype=torch.float64)])
    flat = _all_reduce(flat, "sum", group)
    k = acc.k
    return HessianAcc(sum_xx=flat[: k * k].reshape(k, k).to(acc.sum_xx.device), count=int(flat[-1].item()),
                      absmax=_all_reduce(acc.absmax, "max", group),
                      sum_x=flat[k * k: k * k + k].to(acc.sum_x.device))


def _w8a8_sums(st: ActivationStats | None, k: int) -> torch.Tensor:
    """The float64 sums behind one ActivationStats (zeros for a rank that did not see the layer)."""
    if st is None:
        return torch.zeros(2 * k * k + 3 * k, dtype=torch.float64)
    if st.hessian is None or st.cross is None:
        raise InputError("all_reduce_stats: W8A8 statistics loaded from a file have no [K, K] parts to reduce; "
                         "reduce the statistics capture() returns, before saving them")
    half = st.samples / 2.0
    return torch.cat([st.hessian.double().reshape(-1) * half, st.cross.double().reshape(-1) * half,
                      st.err_sq.double() * half, st.err_x.double() * half, st.err_mean.double() * st.samples])


def all_reduce_stats(stats: Mapping[str, HessianStats], group: Any = None) -> dict[str, HessianStats]:
    """Every rank's finalized :class:`~cq.calibrate.HessianStats` combined as if one process saw all tokens.

    Each rank's normalised statistics are turned back into sums in float64 (``H·T/2``, ``mean·T``,
    …), summed across the ranks and normalised again; layers (and W8A8 bases) a rank never saw count
    as zero tokens there. The result differs from a single-process capture only by the float32
    rounding of each rank's statistics (a relative 2⁻²⁴ per entry). Every rank returns the same dict.

    Example:
        >>> st = HessianStats(hessian=torch.eye(2), input_absmax=torch.ones(2), input_mean=torch.zeros(2), samples=4)
        >>> all_reduce_stats({"a": st})["a"].samples
        4
    """
    import torch.distributed as dist

    _, world = rank_and_world(group)
    if world == 1:
        return dict(stats)
    mine = {key: (int(st.hessian.shape[0]), sorted(int(g) for g in st.w8a8)) for key, st in stats.items()}
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    layout: dict[str, tuple[int, set[int]]] = {}
    for part in everyone:
        for key, (k, groups) in part.items():
            if key in layout and layout[key][0] != k:
                raise InputError(f"all_reduce_stats: layer {key!r} has in_features {layout[key][0]} on one rank and "
                                 f"{k} on another; every rank must capture the same model")
            layout.setdefault(key, (k, set()))[1].update(groups)
    out: dict[str, HessianStats] = {}
    for key in sorted(layout):
        k, groups = layout[key]
        st = stats.get(key)
        t = 0 if st is None else st.samples
        z = torch.zeros(k, dtype=torch.float64)
        parts = [torch.tensor([float(t)], dtype=torch.float64),
                 z.repeat(k) if st is None else st.hessian.double().reshape(-1) * (t / 2.0),
                 z if st is None else st.input_mean.double() * t]
        parts += [_w8a8_sums(None if st is None else st.w8a8.get(g), k) for g in sorted(groups)]
        flat = _all_reduce(torch.cat(parts), "sum", group)
        absmax = _all_reduce(torch.zeros(k) if st is None else st.input_absmax.float(), "max", group)
        total = int(flat[0].item())
        h = flat[1: 1 + k * k].reshape(k, k) * (2.0 / total)
        mean = flat[1 + k * k: 1 + k * k + k] / total
        w8: dict[int, ActivationStats] = {}
        pos = 1 + k * k + k
        for g in sorted(groups):
            s = flat[pos: pos + 2 * k * k + 3 * k]
            pos += 2 * k * k + 3 * k
            hq = s[: k * k].reshape(k, k) * (2.0 / total)
            w8[g] = ActivationStats(groupsize=g, hessian=((hq + hq.t()) * 0.5).float(),
                                    cross=(s[k * k: 2 * k * k].reshape(k, k) * (2.0 / total)).float(),
                                    err_sq=(s[2 * k * k: 2 * k * k + k] * (2.0 / total)).float(),
                                    err_x=(s[2 * k * k + k: 2 * k * k + 2 * k] * (2.0 / total)).float(),
                                    err_mean=(s[2 * k * k + 2 * k:] / total).float(), samples=total)
        out[key] = HessianStats(hessian=((h + h.t()) * 0.5).float(), input_absmax=absmax, input_mean=mean.float(),
                                samples=total, w8a8=w8)
    return out


def capture_distributed(module: torch.nn.Module, inputs: Iterable[Any], *, group: Any = None,
                        **capture_kwargs: Any) -> dict[str, HessianStats]:
    """:func:`cq.calibrate.capture` on this rank's share of ``inputs`` (every world-th item), all-reduced.

    ``inputs`` is the same sequence on every rank (each skips the others' items without running
    them). ``max_tokens`` applies per rank. Keyword arguments are :func:`~cq.calibrate.capture`'s.
    """
    rank, world = rank_and_world(group)
    share = inputs if world == 1 else itertools.islice(inputs, rank, None, world)
    return all_reduce_stats(capture(module, share, **capture_kwargs), group)
