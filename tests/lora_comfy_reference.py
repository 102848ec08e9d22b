"""An independent float64 re-derivation of ComfyUI's LoRA arithmetic, for tests and the accuracy table.

Written from ComfyUI's ``comfy/lora.py: calculate_weight`` / ``comfy/weight_adapter/*.py`` semantics,
without using any of cq.lora: the caller says which base tensor (and slice) a LoRA layer patches,
this module computes the patched tensor in float64.

``patch(W, group, strength, offset=None, swap=False)``: ``group`` maps a suffix (``.lora_up.weight``,
``.hada_w1_a``, ``.alpha`` ...) to a tensor, as in the file.
"""

from __future__ import annotations

import torch

F64 = torch.float64

_UP_DOWN = [  # (up, down, mid) spellings, ComfyUI's order
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
]


def _d(t):
    return t.to(F64)


def _swap(x):
    h = x.shape[0] // 2
    return torch.cat([x[h:], x[:h]], dim=0)


def delta_and_scale(group, shape):
    """(unscaled delta in float64 with ``shape``, alpha/rank-style factor, kind)."""
    alpha = float(group[".alpha"]) if ".alpha" in group else None
    for up, down, mid in _UP_DOWN:
        if up in group:
            u, d = _d(group[up]), _d(group[down])
            r = d.shape[0]
            if mid and mid in group:
                m = _d(group[mid])
                # delta[o, i, h, w] = sum_{r, s} up[o, r] mid[r, s, h, w] down[s, i]
                delta = torch.einsum("or,rshw,si->oihw", u.flatten(1), m, d.flatten(1))
            else:
                delta = (u.reshape(u.shape[0], -1) @ d.reshape(r, -1))
            return delta.reshape(shape), (alpha / r if alpha is not None else 1.0), "lora"
    if ".hada_w1_a" in group:
        w1a, w1b, w2a, w2b = (_d(group[s]) for s in (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"))
        if ".hada_t1" in group:
            t1, t2 = _d(group[".hada_t1"]), _d(group[".hada_t2"])
            m1 = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
            m2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
        else:
            m1, m2 = w1a @ w1b, w2a @ w2b
        return (m1 * m2).reshape(shape), (alpha / w1b.shape[0] if alpha is not None else 1.0), "loha"
    if any(s in group for s in (".lokr_w1", ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a")):
        dim = None
        if ".lokr_w1" in group:
            w1 = _d(group[".lokr_w1"])
        else:
            w1 = _d(group[".lokr_w1_a"]) @ _d(group[".lokr_w1_b"])
            dim = group[".lokr_w1_b"].shape[0]
        if ".lokr_w2" in group:
            w2 = _d(group[".lokr_w2"])
        else:
            w2 = _d(group[".lokr_w2_a"]) @ _d(group[".lokr_w2_b"])
            dim = group[".lokr_w2_b"].shape[0]
        scale = alpha / dim if (alpha is not None and dim is not None) else 1.0
        return torch.kron(w1, w2).reshape(shape), scale, "lokr"
    if ".diff" in group:
        return _d(group[".diff"]).reshape(shape), 1.0, "diff"
    raise ValueError(f"no patch in {sorted(group)}")


def patch(weight, group, strength=1.0, offset=None, swap=False):
    """``weight`` (any dtype) with one LoRA layer applied, as float64."""
    out = _d(weight).clone()
    w = out.narrow(*offset) if offset is not None else out
    if ".set_weight" in group:
        w.copy_(_d(group[".set_weight"]))
        return out
    delta, scale, kind = delta_and_scale(group, tuple(w.shape))
    fn = _swap if swap else (lambda x: x)
    if ".dora_scale" in group:
        calc = w + fn(scale * delta)
        # norm of each input column (over the output axis and any kernel dims)
        dims = [0] + list(range(2, calc.ndim))
        norm = calc.pow(2).sum(dim=dims, keepdim=True).sqrt()
        calc = calc * (_d(group[".dora_scale"]) / norm)
        w.copy_(w + strength * (calc - w))
    else:
        w += fn(strength * scale * delta)
    return out


def bias_patch(bias, diff_b, strength=1.0, offset=None, swap=False):
    out = _d(bias).clone()
    b = out.narrow(*offset) if offset is not None else out
    d = _d(diff_b)
    b += strength * (_swap(d) if swap else d)
    return out
