"""The reference's API document (API.md) works against cq with only the imports changed."""

from __future__ import annotations

import warnings

import pytest
import torch

import cq

REFERENCE_NAMES = [
    "convert_to_int8", "UnifiedSafetensorsLoader", "MemoryEfficientSafeOpen", "QuIPInt8Converter",
    "LearnedRoundingConverter", "GPTQInt8Converter", "QualityReporter", "load_lora_tensors", "load_lora_for_merging",
    "merge_lora_into_weight", "merge_multiple_loras", "load_layer_config", "TARGET_INT8_DTYPE", "COMPUTE_DTYPE",
    "SCALE_DTYPE", "INT8_SYMMETRIC_MAX", "MODEL_FILTERS", "setup_logging", "WeightTensor", "ScaleTensor",
    "HessianMatrix", "FilterFlags", "LayerConfig",
]


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_every_reference_name_is_importable_from_cq(name):
    assert name in cq.__all__ and getattr(cq, name) is not None


def test_constants_have_the_reference_values():
    assert (cq.TARGET_INT8_DTYPE, cq.COMPUTE_DTYPE, cq.SCALE_DTYPE, cq.INT8_SYMMETRIC_MAX) == (
        torch.int8, torch.float32, torch.float32, 127)
    assert "wan" in cq.MODEL_FILTERS and "t5xxl" in cq.MODEL_FILTERS


def _w(seed=0, shape=(96, 256)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_converter_classes_as_documented():
    w = _w()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 256, generator=g) @ torch.randn(256, 256, generator=g)
    h = 2 / 512 * x.T @ x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # device="cuda" falls back to the CPU with a warning here
        gptq = cq.GPTQInt8Converter(block_size=128, device="cuda", actorder=True, lazy_updates=True, use_triton=False)
        quip = cq.QuIPInt8Converter(block_size=128, device="cuda", actorder=True, use_hadamard=True, seed=None,
                                    use_triton=False, lazy_updates=True, store_transformed=False,
                                    requant_scheme="tensor", requant_tensor_use_per_row_scale=True,
                                    streaming_mode="balanced", streaming_thresholds={}, no_memory_limits=False,
                                    use_checkpointed_ldlq=False, checkpointed_ldlq_threshold=8192,
                                    checkpoint_segments=4)
    for conv in (gptq, quip):
        q, scale, deq = conv.convert(w, H=h)[:3]
        assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == torch.float32
        assert float((deq - w).norm() / w.norm()) < 0.02
    lr = cq.LearnedRoundingConverter(block_size=128, num_iter=1000, lr=0.008, optimizer="original",
                                     lr_schedule="adaptive", top_p=0.2, min_k=64, max_k=1024)
    q, scale, deq = lr.convert(w)  # data-free SVD objective from round-to-nearest, never worse on it
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert float((deq - w).norm() / w.norm()) < 0.02


def test_quality_reporter_as_documented():
    reporter = cq.QualityReporter(threshold=30.0)
    w = _w()
    reporter.add_layer("layer_name", w, w + 1e-4 * _w(1))
    text = reporter.get_report_string()
    assert "layer_name" in text


def test_loader_as_documented(model_file):
    with cq.UnifiedSafetensorsLoader(str(model_file), low_memory=True) as loader:
        keys = loader.keys()
        assert "blocks.0.attn.proj.weight" in keys
        assert loader.metadata()["modelspec.title"] == "tiny dit"
        assert tuple(loader.get_shape("blocks.0.attn.proj.weight")) == (64, 64)
        assert loader.get_ndim("x_embedder.proj.weight") == 4
        assert loader.get_tensor("blocks.0.attn.proj.weight").shape == (64, 64)
