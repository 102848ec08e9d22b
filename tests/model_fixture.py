"""A small synthetic model with every kind of tensor cq must handle (shared by the facade and CLI tests)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_model_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A DiT-like state dict: Linear weights (bf16 and fp32, odd shapes), biases, norms, a conv, an
    embedding table, an integer buffer, an empty tensor and a 0-d scalar."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.02, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    return {
        "blocks.0.attn.qkv.weight": r(192, 64, dtype=torch.bfloat16),
        "blocks.0.attn.qkv.bias": r(192, dtype=torch.bfloat16),
        "blocks.0.attn.proj.weight": r(64, 64),
        "blocks.0.attn.proj.bias": r(64),
        "blocks.0.mlp.fc1.weight": r(96, 64),  # 96 is not a multiple of 64: block mode falls back to rows
        "blocks.0.mlp.fc2.weight": r(64, 96),
        "blocks.0.norm1.weight": torch.ones(64),
        "blocks.0.adaLN_modulation.1.weight": r(384, 64),
        "final_layer.linear.weight": r(16, 64),
        "x_embedder.proj.weight": r(64, 4, 2, 2),  # conv: copied unchanged
        "pos_embed": r(1, 16, 64),
        "token_embedding.weight": r(100, 64),
        "position_ids": torch.arange(16, dtype=torch.int64).unsqueeze(0),
        "empty.weight": torch.zeros(0, 64),
        "logit_scale": torch.tensor(4.6),
    }


LINEAR_KEYS = ("blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight",
               "blocks.0.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight")


