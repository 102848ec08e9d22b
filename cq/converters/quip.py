"""``QuIPInt8Converter``: the reference's QuIP class, as a thin facade over :func:`cq.transforms.quip.quip_pipeline`.

``convert`` returns a :class:`QuIPResult`: it unpacks as ``q, scale, dequantized`` (as the
reference's API document shows), and carries the reference code's other six values by name
(``smooth_factors, s_u, s_v, hadamard_quip, hadamard_size_out, hadamard_size_in``; all nine in
order via ``as_reference_tuple()``).

Output mode. Bare tensors carry no rotation flag, so the converter's default is the reference's
``"requant"`` (codes in the original basis: safe to write as plain ``int8_tensorwise``, but no better
than round-to-nearest). Pass ``output="convrot"`` for cq's ComfyUI-native mode, which keeps QuIP's
gain: the codes are then in the ConvRot basis and must be written with
``converter.last_state.basis.comfy_fields()`` (``"convrot": true, "convrot_groupsize": G``), e.g.
with ``cq.io.layer_tensors(converter.last_state)``. ``store_transformed=True`` gives the two-sided
transformed codes with ``s_u``/``s_v`` (see :func:`cq.transforms.quip.quip_extra_tensors`). The
model-level facade ``convert_to_int8(optimizer="quip")`` and the CLI default to ``"convrot"``.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Mapping

import torch

from ..errors import ConfigError, InputError
from ..state import LayerState

from ..transforms.quip import QuIPConfig, quip_pipeline
from ..transforms.rounding import reconstruct

__all__ = ["QuIPInt8Converter", "QuIPResult"]

_STREAMING_MODES = ("off", "minimal", "balanced", "aggressive", "auto")


class QuIPResult(tuple):
    """What :meth:`QuIPInt8Converter.convert` returns: ``(q, scale, dequantized)`` plus named extras.

    It unpacks as the reference API document shows, ``q, scale, dequantized = converter.convert(W)``;
    the reference code's six further values stay reachable by name (and all nine, in the reference
    code's order, through :meth:`as_reference_tuple`).

    ``q``: int8 ``[N, K]`` codes as stored; ``scale``: float32, ``[N, 1]`` (per row), ``()`` (one
    scale) or ``[N, K/bs, 1]`` (requant ``"block"``); ``dequantized``: float32 ``[N, K]``, the
    *original-basis* weight the stored layer represents (the reference returned QuIP's
    intermediate ``Ŵ`` here even when it stored a re-quantized tensor); ``smooth_factors``: always
    ``None`` (SmoothQuant is not implemented yet); ``s_u`` / ``s_v``: float32 ±1 ``[N]`` / ``[K]``
    sign vectors in transformed mode, else ``None``; ``hadamard_quip``: transformed mode with
    Hadamard incoherence; ``hadamard_size_out`` / ``hadamard_size_in``: N and K in transformed mode
    (no padding), else 0. For sizes that are not powers of two the signs alone do not describe
    the transform (Paley or random Kronecker factors): write the layer with
    ``quip_extra_tensors(attrs.evolve(converter.last_state, name=layer))``.

    Example:
        >>> r = QuIPResult(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, 1), torch.zeros(2, 4))
        >>> q, scale, deq = r
        >>> len(r), r.s_u, r.hadamard_size_in, len(r.as_reference_tuple())
        (3, None, 0, 9)
    """

    #: the names of the extras, in the reference code's order after the first three
    EXTRAS = ("smooth_factors", "s_u", "s_v", "hadamard_quip", "hadamard_size_out", "hadamard_size_in")

    def __new__(cls, q: torch.Tensor, scale: torch.Tensor, dequantized: torch.Tensor,
                smooth_factors: torch.Tensor | None = None, s_u: torch.Tensor | None = None,
                s_v: torch.Tensor | None = None, hadamard_quip: bool = False, hadamard_size_out: int = 0,
                hadamard_size_in: int = 0) -> "QuIPResult":
        self = super().__new__(cls, (q, scale, dequantized))
        self.smooth_factors = smooth_factors
        self.s_u = s_u
        self.s_v = s_v
        self.hadamard_quip = hadamard_quip
        self.hadamard_size_out = hadamard_size_out
        self.hadamard_size_in = hadamard_size_in
        return self

    @property
    def q(self) -> torch.Tensor:
        return self[0]

    @property
    def scale(self) -> torch.Tensor:
        return self[1]

    @property
    def dequantized(self) -> torch.Tensor:
        return self[2]

    def as_reference_tuple(self) -> tuple:
        """All nine values in the reference code's order (``q, scale, dequantized, smooth_factors, s_u,
        s_v, hadamard_quip, hadamard_size_out, hadamard_size_in``)."""
        return (*self, *(getattr(self, n) for n in self.EXTRAS))

    def __repr__(self) -> str:
        extras = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.EXTRAS[3:])
        return f"QuIPResult(q={tuple(self.q.shape)}, scale={tuple(self.scale.shape)}, {extras})"

    def __reduce__(self):  # pickling/copying keeps the extras (a tuple subclass would drop them)
        return (QuIPResult, self.as_reference_tuple())


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"QuIPInt8Converter: device={str(device)!r} requested but CUDA is not available; "
                      "running on CPU", UserWarning, stacklevel=3)
        return torch.device("cpu")
    return dev


class QuIPInt8Converter:
    """QuIP INT8 conversion of one weight at a time, with the reference's constructor.

    Every documented parameter is accepted. ``lazy_updates=False`` runs LDLQ's textbook loop (same
    codes, slower). ``use_triton=True`` warns: there is no Triton LDLQ kernel, the torch
    implementation runs (the reference only used Triton with one tensor-wide scale, i.e. never).
    ``streaming_mode``, ``streaming_thresholds`` and ``no_memory_limits`` are validated and
    otherwise have no effect: cq's memory policy belongs to the model-level runner, and
    ``use_checkpointed_ldlq`` is the exact smaller-memory option. Reference-only parameters:
    ``percdamp``, ``use_diagonal_rescaling`` (→ ``rescale``) and ``use_random_permutation``
    (→ ``permute``) are honoured; ``ldlq_iterations``, ``use_greedy_coordinate_descent`` /
    ``greedy_cd_iterations``, ``frobenius_rho`` and ``use_learned_rounding`` add stages after LDLQ
    (:class:`~cq.transforms.quip_refine.QuIPRefineConfig`; each never worse on ``tr(E H Eᵀ)``);
    ``use_frobenius_scaling`` has no effect (the reference applied it only on its broken
    non-Hadamard path; cq always uses absmax scales). ``seed=None`` means 0.
    ``output``: ``None`` (``"transformed"`` if ``store_transformed`` else ``"requant"``),
    ``"requant"``, ``"convrot"`` or ``"transformed"``; see the module docstring.

    Example:
        >>> c = QuIPInt8Converter(device="cpu", output="convrot")
        >>> r = c.convert(torch.randn(8, 64))
        >>> r.q.dtype, tuple(r.scale.shape), c.last_state.basis
        (torch.int8, (8, 1), ConvRot(groupsize=64))
    """

    def __init__(self, block_size: int = 128, device: str = "cuda", actorder: bool = True,
                 use_hadamard: bool = True, seed: int | None = None, use_triton: bool = False,
                 lazy_updates: bool = True, store_transformed: bool = False, requant_scheme: str = "tensor",
                 requant_tensor_use_per_row_scale: bool = True, streaming_mode: str = "balanced",
                 streaming_thresholds: Mapping[str, Any] | None = None, no_memory_limits: bool = False,
                 use_checkpointed_ldlq: bool = False, checkpointed_ldlq_threshold: int = 8192,
                 checkpoint_segments: int = 4, *, percdamp: float = 0.01, use_learned_rounding: bool = False,
                 ldlq_iterations: int = 1, use_diagonal_rescaling: bool = True, use_frobenius_scaling: bool = True,
                 use_random_permutation: bool = True, use_greedy_coordinate_descent: bool = False,
                 greedy_cd_iterations: int = 100, frobenius_rho: float = 1.0,
                 output: Literal["requant", "convrot", "transformed"] | None = None,
                 convrot_groupsize: int | str = "auto"):
        from ..transforms.learned_round import LearnedRoundConfig
        from ..transforms.quip_refine import QuIPRefineConfig

        self.refine = QuIPRefineConfig(
            ldlq_iterations=ldlq_iterations, greedy_cd=bool(use_greedy_coordinate_descent),
            greedy_cd_iterations=greedy_cd_iterations, frobenius_rho=frobenius_rho,
            learned_rounding=LearnedRoundConfig(optimizer="adamw") if use_learned_rounding else None)
        if streaming_mode not in _STREAMING_MODES:
            raise ConfigError(f"streaming_mode={streaming_mode!r} must be one of {list(_STREAMING_MODES)}")
        if streaming_thresholds is not None and not isinstance(streaming_thresholds, Mapping):
            raise ConfigError(f"streaming_thresholds must be a dict, got {type(streaming_thresholds).__name__}")
        if output is None:
            output = "transformed" if store_transformed else "requant"
        self.cfg = QuIPConfig(actorder=actorder, use_hadamard=use_hadamard, seed=seed,
                              store_transformed=store_transformed, requant_scheme=requant_scheme,
                              requant_per_row=requant_tensor_use_per_row_scale,
                              checkpointed=use_checkpointed_ldlq, checkpoint_threshold=checkpointed_ldlq_threshold,
                              checkpoint_segments=checkpoint_segments, block_size=block_size,
                              percdamp=percdamp, output=output, convrot_groupsize=convrot_groupsize,
                              rescale=use_diagonal_rescaling, permute=use_random_permutation,
                              lazy_batch=bool(lazy_updates))
        if use_triton:
            warnings.warn("QuIPInt8Converter: use_triton=True, but cq has no Triton LDLQ kernel; "
                          "using the torch implementation", UserWarning, stacklevel=2)
        self.device = _resolve_device(device)
        self.lazy_updates = bool(lazy_updates)
        self.streaming_mode = streaming_mode
        self.no_memory_limits = bool(no_memory_limits)
        self.low_memory = False  # the reference's pipeline sets this attribute; kept for scripts
        self.pipeline = quip_pipeline(self.cfg)
        if self.refine.active:  # stages after LDLQ (cq.transforms.quip_refine); never worse on tr(E H Eᵀ)
            from ..transforms.quip_refine import with_refinements

            self.pipeline = with_refinements(self.pipeline, self.refine)
        #: The LayerState of the last :meth:`convert` (rotation, metrics, notes, history).
        self.last_state: LayerState | None = None

    def cleanup(self) -> None:
        """Drop the last state (the reference's pipeline calls this after each layer)."""
        self.last_state = None

    def convert(self, W: torch.Tensor, H: torch.Tensor | None = None, activation_scales: torch.Tensor | None = None,
                smoothquant_alpha: float = 0.5) -> QuIPResult:
        """Quantize one ``[N, K]`` weight (``H``: ``[K, K]`` Hessian ``2/T·XᵀX``, ``None`` → identity)."""
        if activation_scales is not None:
            raise ConfigError("activation_scales: a SmoothQuant factor must fold into a neighbouring layer, which a "
                              "one-weight converter cannot see (scaling this weight alone changes the model's "
                              "output); use the model-level --smoothquant (cq.transforms.smoothquant), or pass "
                              "activation_scales=None")
        if not isinstance(W, torch.Tensor) or W.ndim != 2 or not W.is_floating_point() or W.numel() == 0:
            raise InputError(f"QuIPInt8Converter.convert needs a non-empty 2-D float weight, got "
                             f"{type(W).__name__ if not isinstance(W, torch.Tensor) else (W.dtype, tuple(W.shape))}")
        w = W.detach().to(self.device, torch.float32)
        h = None if H is None else H.detach().to(self.device, torch.float32)
        state = self.pipeline(LayerState.from_weight("weight", w, hessian=h))
        self.last_state = state
        deq = reconstruct(state).cpu()
        q = state.codes.cpu()
        scale = state.scale.to(torch.float32).cpu()
        if self.cfg.resolved_output == "transformed":
            inc = state.basis
            n, k = state.shape
            s_u = inc.u.signs.to(torch.float32) if inc.u.signs is not None else torch.ones(n)
            s_v = inc.v.signs.to(torch.float32) if inc.v.signs is not None else torch.ones(k)
            return QuIPResult(q, scale, deq, None, s_u, s_v, self.cfg.use_hadamard, n, k)
        return QuIPResult(q, scale, deq)
