"""``GPTQInt8Converter``: the reference tool's GPTQ class as a thin facade over a cq pipeline."""

from __future__ import annotations

import warnings

import torch

from ..errors import ConfigError
from ..recipes import gptq_pipeline
from ..state import Granularity, LayerState, PerBlock, PerGroup, PerRow, PerTensor
from ..transforms.gptq import GPTQConfig
from ..transforms.hessian import DampingConfig
from ..transforms.rounding import working_dequantized

__all__ = ["GPTQInt8Converter"]


_SCALING = {"row": PerRow, "axis": PerRow, "tensor": PerTensor}


def _granularity(scaling: str | Granularity, block_size: int) -> Granularity:
    if isinstance(scaling, (PerTensor, PerRow, PerBlock, PerGroup)):
        return scaling
    if scaling in _SCALING:
        return _SCALING[scaling]()
    if scaling == "block":
        return PerBlock(block_size)
    if scaling == "group":
        return PerGroup(block_size)
    raise ConfigError(f"scaling={scaling!r} must be 'row' (ComfyUI-native [N,1], the default), 'tensor' "
                      "(one scale, the reference's only mode), 'block' (2-D tiles of block_size) or 'group' "
                      "(1 x block_size row groups), or a cq granularity such as PerRow()")


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a torch device; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"GPTQInt8Converter: device={str(device)!r} requested but CUDA is not available; "
                      "running on the CPU", stacklevel=3)
        return torch.device("cpu")
    return dev


class GPTQInt8Converter:
    """GPTQ INT8 with the reference's constructor and ``convert(weight, H)``, but exact and per row.

    Differences from the reference (``convert_to_quant/converters/gptq_int8.py``): scales are
    per row ``[N, 1]`` by default (ComfyUI-native; ``scaling="tensor"`` gives the reference's
    single scale); the update is exact column-by-column GPTQ with lazy block updates (the
    reference's default "lazy-64" path skips feedback inside 64-column batches);
    ``lazy_updates=False`` runs the textbook loop (same codes, slower); ``use_triton=True`` warns
    and runs the torch implementation (cq has no Triton GPTQ kernel); ``low_memory`` and
    ``streaming`` change nothing (one layer is always processed in bounded memory); a Hessian
    that cannot be factored gives round-to-nearest codes and a note instead of a crash.
    ``device="cuda"`` without CUDA warns and uses the CPU.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(512, 32, generator=g)
        >>> q, scale, deq = GPTQInt8Converter().convert(torch.randn(16, 32, generator=g), H=x.T @ x)
        >>> q.dtype, tuple(scale.shape), deq.dtype
        (torch.int8, (16, 1), torch.float32)
    """

    def __init__(self, block_size: int = 128, percdamp: float = 0.01, device: str | torch.device = "cpu",
                 actorder: bool = False, use_triton: bool = False, lazy_updates: bool = True,
                 low_memory: bool = False, streaming: bool = False, *, scaling: str | Granularity = "row"):
        self.block_size = block_size
        self.percdamp = percdamp
        self.actorder = bool(actorder)
        self.use_triton = bool(use_triton)
        self.lazy_updates = bool(lazy_updates)
        self.low_memory = bool(low_memory)
        self.streaming = bool(streaming)
        self.granularity = _granularity(scaling, block_size)
        self.config = GPTQConfig(block_size=block_size, damping=DampingConfig(percdamp=percdamp),
                                 actorder=self.actorder, lazy_batch=self.lazy_updates)
        self.device = _device(device)
        if self.use_triton:
            warnings.warn("GPTQInt8Converter: use_triton=True, but cq has no Triton GPTQ kernel; using the exact "
                          "torch implementation (same codes)", stacklevel=2)
        self.pipeline = gptq_pipeline(granularity=self.granularity, gptq=self.config)

    def __repr__(self) -> str:
        return (f"GPTQInt8Converter(block_size={self.block_size}, percdamp={self.percdamp}, device='{self.device}', "
                f"actorder={self.actorder}, granularity={self.granularity!r})")

    def convert_state(self, weight: torch.Tensor, H: torch.Tensor | None = None, *, name: str = "weight") -> LayerState:
        """Run the pipeline and return the final :class:`~cq.state.LayerState` (codes, scale, metrics, notes)."""
        w = weight.detach().to(self.device)
        h = None if H is None else H.detach().to(self.device)
        return self.pipeline(LayerState.from_weight(name, w, hessian=h))

    def convert(self, weight: torch.Tensor, H: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``weight`` [N, K] with Hessian ``H`` [K, K] (any positive multiple of XᵀX; None → H = I).

        Returns ``(q int8 [N, K], scale float32 [N, 1] (or () / block shapes), dequantized float32 [N, K])``
        on the CPU.
        """
        out = self.convert_state(weight, H)
        return out.codes.cpu(), out.scale.to(torch.float32).cpu(), working_dequantized(out).cpu()
