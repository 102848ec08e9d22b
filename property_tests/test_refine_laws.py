"""Laws of cq's code refinements and SmoothQuant folds.

* learned_round, ldlq_repass, greedy_cd and frobenius_rescale are never worse than their start on
  their objective, row by row (tr(E H Eᵀ) decouples over rows), whatever the Hessian;
* a SmoothQuant fold preserves the float function of whole Flux-1 blocks, for any α and factors.
"""

import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cq import LayerState, PerGroup, PerRow, PerTensor
from cq.model import DictView
from cq.transforms import ScaleConfig, absmax_scale, round_to_nearest
from cq.transforms.learned_round import LearnedRoundConfig, learned_round
from cq.transforms.quip_refine import (GreedyCDConfig, RepassConfig, frobenius_rescale, greedy_cd, ldlq_repass,
                                       row_losses)
from cq.transforms.scales import expand_scale

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny Flux-1 model lives there
from flux_tiny import calibration_stats, forward, make_state_dict, random_inputs  # noqa: E402


@st.composite
def problems(draw):
    """(W [N, K], H [K, K]): correlated inputs (T may be < K), optional outlier and dead channels, any scale."""
    n = draw(st.integers(1, 8)) * 2
    k = draw(st.integers(1, 8)) * 4
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 0.02, 1.0, 1e3]))
    t = draw(st.integers(1, 3 * k))
    x = torch.randn(t, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        x[:, torch.randint(0, k, (1,), generator=g)] *= 30
    if draw(st.booleans()):
        x[:, torch.randint(0, k, (max(1, k // 8),), generator=g)] = 0
    h = 2.0 / t * x.T @ x
    if draw(st.booleans()):  # indefinite: the law must still hold on the stated objective
        h = h - 0.5 * float(h.diagonal().mean()) * torch.eye(k, dtype=torch.float64)
    return w.float(), h.float()


def loss(state):
    return row_losses(state.weight, expand_scale(state.scale, state.granularity, state.shape), state.codes,
                      state.hessian)


_ZERO_H = (torch.tensor([[0.5, -1.5, 2.5, 0.0]]), torch.zeros(4, 4))


@settings(max_examples=25, deadline=None)
@given(problems(), st.sampled_from([PerTensor(), PerRow(), PerGroup(4)]),
       st.sampled_from(["learned_round", "ldlq_repass", "greedy_cd", "frobenius_rescale"]),
       st.sampled_from(["original", "adamw", "radam"]))
@example(_ZERO_H, PerRow(), "learned_round", "original")
@example(_ZERO_H, PerRow(), "greedy_cd", "original")
@example((torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 3.0], [3.0, 1.0]])), PerRow(), "ldlq_repass", "adamw")
def test_refinements_never_worse_than_their_start(problem, gran, method, optimizer):
    w, h = problem
    start = round_to_nearest(absmax_scale(LayerState.from_weight("fc", w, hessian=h), cfg=ScaleConfig(gran)))
    if method == "learned_round":
        out = learned_round(start, cfg=LearnedRoundConfig(optimizer=optimizer, num_iter=20, eval_every=5))
    elif method == "ldlq_repass":
        out = ldlq_repass(start, cfg=RepassConfig(passes=2, block_size=4))
    elif method == "greedy_cd":
        out = greedy_cd(start, cfg=GreedyCDConfig(10))
    else:
        if isinstance(gran, PerGroup):
            return
        out = frobenius_rescale(start)
    assert out.codes.dtype == torch.int8 and int(out.codes.abs().max()) <= 127
    if method == "frobenius_rescale" and isinstance(gran, PerTensor):  # one shared scale: a whole-tensor law
        assert float(loss(out).sum()) <= float(loss(start).sum())
    else:
        assert torch.all(loss(out) <= loss(start))


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.floats(0.0, 1.0), st.sampled_from([4.0, 30.0]), st.integers(-3, 3))
@example(0, 0.0, 30.0, 0)
@example(0, 1.0, 30.0, 3)
def test_smoothing_preserves_the_float_function(seed, alpha, outliers, log_spread):
    # Every fold cq finds is applied, with factors from its formula at any α, times random positive
    # jitter spanning 10^±|log_spread| (the law must not depend on the factors being "good").
    # Bound: float64 folds change each weight by one multiply/divide, ~1e-16 relative per element,
    # amplified by at most the blocks' conditioning and the factors' spread; 1e-10 leaves margin.
    from cq.transforms.smoothquant import find_folds, fold_edits, fold_factors

    sd = make_state_dict(16, 2, double=1, single=1, seed=seed % 1000, outliers=outliers)
    stats = calibration_stats(sd, [random_inputs(16, seed=seed % 997, img_tokens=6, txt_tokens=3)])
    view = DictView(sd)
    folds, _ = find_folds(view)
    g = torch.Generator().manual_seed(seed)
    edits = None
    for f in folds:
        a = stats[f.consumers[0]].input_absmax.double()[f.col_start:f.col_start + f.width]
        w = sd[f"{f.consumers[0]}.weight"][:, f.col_start:f.col_start + f.width].abs().amax(0)
        s = fold_factors(a, w, alpha, normalize=f.normalize)
        s = s * 10.0 ** (abs(log_spread) * (2 * torch.rand(f.width, generator=g, dtype=torch.float64) - 1))
        e = fold_edits(f, s)
        edits = e if edits is None else edits | e
    sd2 = {k: edits.apply(k, v) for k, v in sd.items()}
    img, txt, vec = random_inputs(16, seed=seed % 991 + 1, img_tokens=5, txt_tokens=4)
    y, y2 = forward(sd, img, txt, vec), forward(sd2, img, txt, vec)
    assert float((y2 - y).norm()) <= 1e-10 * float(y.norm())
