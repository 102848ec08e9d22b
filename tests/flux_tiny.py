"""A tiny Flux-1-style DiT as a pure function of its state dict (tests and benchmarks/bench_smoothquant.py).

``flux2=True`` builds the Flux-2 layout instead (ComfyUI's ``image_model="flux2"``): shared
``double_stream_modulation_img/txt`` and ``single_stream_modulation`` Linears, no biases, SiLU-gated
MLPs (``silu(first half) · second half``: ``mlp.0`` has 2·M rows, ``linear1`` 3·H + 2·M).

Same key names and data flow as ComfyUI's ``comfy/ldm/flux`` blocks: double blocks (``img_mod`` /
``txt_mod`` adaLN with chunks shift, scale, gate ×2; fused ``qkv`` split as ``[3, heads, head_dim]``;
QK RMSNorm; joint attention over text+image tokens; ``proj``; ``mlp.0`` → GELU → ``mlp.2``), single
blocks (``modulation``, ``linear1`` = qkv + MLP, ``linear2`` on ``[attention, GELU(mlp)]``) and the
final layer (``adaLN_modulation.1`` with chunks shift, scale). ``linear`` hooks every Linear so that a
test can record inputs (calibration) or quantize activations (ComfyUI's W8A8 runtime).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Linear = Callable[[str, torch.Tensor, dict], torch.Tensor]


def plain_linear(name: str, x: torch.Tensor, sd: dict) -> torch.Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def make_state_dict(hidden: int = 32, heads: int = 2, double: int = 1, single: int = 1, *, seed: int = 0,
                    outliers: float = 8.0, dtype=torch.float64, flux2: bool = False) -> dict[str, torch.Tensor]:
    """Random weights; a few adaLN ``scale``/``shift`` bias channels and V rows are large (activation outliers)."""
    if flux2:
        return _make_flux2(hidden, heads, double, single, seed=seed, outliers=outliers, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    h, mlp = hidden, 4 * hidden

    def lin(name, n, k, std=None):
        sd[f"{name}.weight"] = torch.randn(n, k, generator=g, dtype=dtype) * (std or 1 / math.sqrt(k))
        sd[f"{name}.bias"] = torch.randn(n, generator=g, dtype=dtype) * 0.02

    def outlier_mod(name, chunks):
        b = sd[f"{name}.bias"].view(chunks, h)
        idx = torch.randperm(h, generator=g)[: max(1, h // 16)]
        for c in range(chunks):
            if c % 3 in (0, 1):  # shift, scale chunks (final layer: shift, scale)
                b[c, idx] += outliers * (1 + torch.rand(len(idx), generator=g, dtype=dtype))

    sd: dict[str, torch.Tensor] = {}
    for i in range(double):
        p = f"double_blocks.{i}"
        for st in ("img", "txt"):
            lin(f"{p}.{st}_mod.lin", 6 * h, h)
            outlier_mod(f"{p}.{st}_mod.lin", 6)
            lin(f"{p}.{st}_attn.qkv", 3 * h, h)
            sd[f"{p}.{st}_attn.qkv.weight"][2 * h + torch.randperm(h, generator=g)[:2]] *= outliers
            sd[f"{p}.{st}_attn.norm.query_norm.scale"] = 1 + 0.1 * torch.randn(h // heads, generator=g, dtype=dtype)
            sd[f"{p}.{st}_attn.norm.key_norm.scale"] = 1 + 0.1 * torch.randn(h // heads, generator=g, dtype=dtype)
            lin(f"{p}.{st}_attn.proj", h, h)
            lin(f"{p}.{st}_mlp.0", mlp, h)
            lin(f"{p}.{st}_mlp.2", h, mlp)
    for i in range(single):
        p = f"single_blocks.{i}"
        lin(f"{p}.modulation.lin", 3 * h, h)
        outlier_mod(f"{p}.modulation.lin", 3)
        lin(f"{p}.linear1", 3 * h + mlp, h)
        sd[f"{p}.linear1.weight"][2 * h + torch.randperm(h, generator=g)[:2]] *= outliers
        sd[f"{p}.norm.query_norm.scale"] = 1 + 0.1 * torch.randn(h // heads, generator=g, dtype=dtype)
        sd[f"{p}.norm.key_norm.scale"] = 1 + 0.1 * torch.randn(h // heads, generator=g, dtype=dtype)
        lin(f"{p}.linear2", h, h + mlp)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    outlier_mod("final_layer.adaLN_modulation.1", 2)
    lin("final_layer.linear", 16, h)
    return sd


def _make_flux2(hidden, heads, double, single, *, seed, outliers, dtype):
    g = torch.Generator().manual_seed(seed)
    h, mlp = hidden, 3 * hidden  # Flux-2: mlp_ratio 3, gated

    def lin(name, n, k):
        sd[f"{name}.weight"] = torch.randn(n, k, generator=g, dtype=dtype) / math.sqrt(k)

    def big_rows(name, start, stop, count=2):
        sd[f"{name}.weight"][start + torch.randperm(stop - start, generator=g)[:count]] *= outliers

    sd: dict[str, torch.Tensor] = {}
    lin("double_stream_modulation_img.lin", 6 * h, h)
    lin("double_stream_modulation_txt.lin", 6 * h, h)
    lin("single_stream_modulation.lin", 3 * h, h)
    for name, chunks in (("double_stream_modulation_img.lin", 6), ("double_stream_modulation_txt.lin", 6),
                         ("single_stream_modulation.lin", 3)):
        big_rows(name, 0, h)  # shift outliers (from the weights: there is no bias)
    for i in range(double):
        p = f"double_blocks.{i}"
        for st in ("img", "txt"):
            lin(f"{p}.{st}_attn.qkv", 3 * h, h)
            big_rows(f"{p}.{st}_attn.qkv", 2 * h, 3 * h)
            sd[f"{p}.{st}_attn.norm.query_norm.scale"] = 1 + 0.1 * torch.randn(h // heads, generator=g, dtype=dtype)
            sd[f"{p}.{st}_attn.norm.key_norm.scale"] = 1 + 0.1 * torch.randn(h // heads, generator=g, dtype=dtype)
            lin(f"{p}.{st}_attn.proj", h, h)
            lin(f"{p}.{st}_mlp.0", 2 * mlp, h)
            big_rows(f"{p}.{st}_mlp.0", mlp, 2 * mlp, 3)  # value-half outliers: mlp.2's input channels
            lin(f"{p}.{st}_mlp.2", h, mlp)
    for i in range(single):
        p = f"single_blocks.{i}"
        lin(f"{p}.linear1", 3 * h + 2 * mlp, h)
        big_rows(f"{p}.linear1", 2 * h, 3 * h)
        big_rows(f"{p}.linear1", 3 * h + mlp, 3 * h + 2 * mlp, 3)
        sd[f"{p}.norm.query_norm.scale"] = 1 + 0.1 * torch.randn(h // heads, generator=g, dtype=dtype)
        sd[f"{p}.norm.key_norm.scale"] = 1 + 0.1 * torch.randn(h // heads, generator=g, dtype=dtype)
        lin(f"{p}.linear2", h, h + mlp)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    lin("final_layer.linear", 16, h)
    return sd


def _gated(y):
    gate, value = y.chunk(2, dim=-1)
    return F.silu(gate) * value


def _ln(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _rms(x, scale):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * scale


def _attention(q, k, v):
    # q, k, v: [B, heads, L, hd] -> [B, L, heads·hd]
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    return a.transpose(1, 2).reshape(a.shape[0], a.shape[2], -1)


def _split_qkv(qkv, heads):
    b, length, three_h = qkv.shape
    hd = three_h // 3 // heads
    q, k, v = qkv.view(b, length, 3, heads, hd).permute(2, 0, 3, 1, 4)
    return q, k, v


def forward(sd: dict, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, *, heads: int = 2,
            linear: Linear = plain_linear) -> torch.Tensor:
    """The model's output for image tokens ``img`` [B, Li, H], text tokens ``txt`` [B, Lt, H], vector ``vec`` [B, H]."""
    h = img.shape[-1]
    lt = txt.shape[1]
    sv = F.silu(vec)
    flux2 = "double_stream_modulation_img.lin.weight" in sd
    act = _gated if flux2 else (lambda y: F.gelu(y, approximate="tanh"))
    if flux2:  # computed once, shared by every block
        shared = {st: linear(f"double_stream_modulation_{st}.lin", sv, sd)[:, None, :].chunk(6, dim=-1)
                  for st in ("img", "txt")}
        shared["single"] = linear("single_stream_modulation.lin", sv, sd)[:, None, :].chunk(3, dim=-1)
    i = 0
    while f"double_blocks.{i}.img_attn.qkv.weight" in sd:
        p = f"double_blocks.{i}"
        mods, qs, ks, vs = {}, [], [], []
        for st, x in (("txt", txt), ("img", img)):
            m = shared[st] if flux2 else linear(f"{p}.{st}_mod.lin", sv, sd)[:, None, :].chunk(6, dim=-1)
            mods[st] = m
            qkv = linear(f"{p}.{st}_attn.qkv", (1 + m[1]) * _ln(x) + m[0], sd)
            q, k, v = _split_qkv(qkv, heads)
            qs.append(_rms(q, sd[f"{p}.{st}_attn.norm.query_norm.scale"]))
            ks.append(_rms(k, sd[f"{p}.{st}_attn.norm.key_norm.scale"]))
            vs.append(v)
        attn = _attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2))
        outs = {"txt": attn[:, :lt], "img": attn[:, lt:]}
        new = {}
        for st, x in (("txt", txt), ("img", img)):
            m = mods[st]
            x = x + m[2] * linear(f"{p}.{st}_attn.proj", outs[st], sd)
            y = linear(f"{p}.{st}_mlp.0", (1 + m[4]) * _ln(x) + m[3], sd)
            new[st] = x + m[5] * linear(f"{p}.{st}_mlp.2", act(y), sd)
        txt, img = new["txt"], new["img"]
        i += 1
    x = torch.cat([txt, img], 1)
    i = 0
    while f"single_blocks.{i}.linear1.weight" in sd:
        p = f"single_blocks.{i}"
        m = shared["single"] if flux2 else linear(f"{p}.modulation.lin", sv, sd)[:, None, :].chunk(3, dim=-1)
        y = linear(f"{p}.linear1", (1 + m[1]) * _ln(x) + m[0], sd)
        qkv, mlp = torch.split(y, [3 * h, y.shape[-1] - 3 * h], dim=-1)
        q, k, v = _split_qkv(qkv, heads)
        attn = _attention(_rms(q, sd[f"{p}.norm.query_norm.scale"]), _rms(k, sd[f"{p}.norm.key_norm.scale"]), v)
        x = x + m[2] * linear(f"{p}.linear2", torch.cat([attn, act(mlp)], -1), sd)
        i += 1
    x = x[:, lt:]
    shift, scale = linear("final_layer.adaLN_modulation.1", sv, sd).chunk(2, dim=1)
    x = (1 + scale[:, None]) * _ln(x) + shift[:, None]
    return linear("final_layer.linear", x, sd)


def random_inputs(hidden: int, *, batch: int = 2, img_tokens: int = 16, txt_tokens: int = 8, seed: int = 0,
                  dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, img_tokens, hidden, generator=g, dtype=dtype),
            torch.randn(batch, txt_tokens, hidden, generator=g, dtype=dtype),
            torch.randn(batch, hidden, generator=g, dtype=dtype))


def recording_linear(store: dict) -> Linear:
    """A ``linear`` that appends each Linear's input rows to ``store[name]``."""
    def lin(name, x, sd):
        store.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).clone())
        return plain_linear(name, x, sd)
    return lin


def _q_rows(m):
    s = m.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    return torch.clamp(torch.round(m / s), -127, 127) * s


def rotate(x: torch.Tensor, groupsize: int | None) -> torch.Tensor:
    """ComfyUI's ConvRot: ``x`` times the block-diagonal regular Hadamard of ``groupsize`` (None: identity)."""
    if groupsize is None:
        return x
    from cq.transforms.hadamard import regular_hadamard

    r = regular_hadamard(groupsize, dtype=x.dtype)
    return (x.reshape(*x.shape[:-1], -1, groupsize) @ r).reshape(x.shape)


def w8a8_linear(skip: tuple[str, ...] = ("_mod.lin", "modulation.lin", "adaLN_modulation", "modulation_"), *,
                weights: dict | None = None, groupsize: int | None = None, quantize_weights: bool = True) -> Linear:
    """ComfyUI's int8 forward: per-token int8 activations (after ConvRot when ``groupsize``) × int8 weights.

    ``weights``: ``{layer: dequantized weight in the rotated basis}`` from a recipe; otherwise the
    float weight is rotated and rounded per row (``quantize_weights=False``: exact weights, the
    activation-only floor). Modulation Linears stay float, as in a typical conversion.
    """
    def lin(name, x, sd):
        if any(t in name for t in skip):
            return plain_linear(name, x, sd)
        if weights is not None and name in weights:
            w = weights[name]
        else:
            w = rotate(sd[f"{name}.weight"], groupsize)
            w = _q_rows(w) if quantize_weights else w
        return F.linear(_q_rows(rotate(x, groupsize)), w.to(x.dtype), sd.get(f"{name}.bias"))
    return lin


def calibration_stats(sd: dict, inputs, *, heads: int = 2):
    """``{layer: HessianStats}`` from running ``inputs`` (a list of (img, txt, vec)) through the float model."""
    from cq.calibrate import HessianStats

    store: dict = {}
    for img, txt, vec in inputs:
        forward(sd, img, txt, vec, heads=heads, linear=recording_linear(store))
    out = {}
    for name, xs in store.items():
        x = torch.cat(xs).to(torch.float64)
        out[name] = HessianStats(hessian=(2.0 / x.shape[0] * x.T @ x).float(), input_absmax=x.abs().amax(0).float(),
                                 input_mean=x.mean(0).float(), samples=x.shape[0])
    return out
