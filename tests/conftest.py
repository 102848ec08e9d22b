"""Shared fixtures: a small synthetic model file with every kind of tensor cq must handle."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.model_fixture import make_model_tensors


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(make_model_tensors(), str(path), metadata={"modelspec.title": "tiny dit", "format": "pt"})
    return path
