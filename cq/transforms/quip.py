"""QuIP for INT8 as a composed pipeline: rotation → per-row scales → LDLQ, in three output layouts.

``output`` (see :class:`QuIPConfig`):

* ``"convrot"`` (cq's default): ComfyUI's one-sided ConvRot rotation (regular Hadamard, group 256
  or ``"auto"``), per-row ``[N, 1]`` scales of the rotated weight, LDLQ with the rotated Hessian.
  Written as ``int8_tensorwise`` with ``"convrot": true``: **vanilla ComfyUI loads it and keeps the
  whole gain**, because it rotates activations at runtime. On outlier-heavy layers this is the best
  INT8 layout cq can write (algorithms.md §8.2, §8.7).
* ``"requant"`` (the reference's default): two-sided incoherence + LDLQ, then the reconstruction
  ``Ŵ`` is mapped back to the original basis and *re-quantized* with round-to-nearest (tensor,
  ``[N, 1]`` or 1×block_size group scales). The second rounding adds a fresh RTN error on top of
  QuIP's, so the result is no better than plain RTN with the same scales (measured in
  ``benchmarks/bench_quip.py`` and the README). Kept for compatibility only.
* ``"transformed"`` (``store_transformed=True``): codes stay in the two-sided transformed basis and
  the layer carries the extra tensors of :func:`quip_extra_tensors`. Needs a custom loader
  (:func:`cq.io.quip_file.dequantize_transformed`); its format label
  :data:`QUIP_TRANSFORMED_FORMAT` is deliberately unknown to vanilla ComfyUI so that it fails loudly
  instead of multiplying un-rotated activations by rotated weights (which the reference's
  ``int8_tensorwise`` label silently does).

Damping and act-order are part of the ``ldlq`` stage's config (:class:`~cq.transforms.ldlq.LDLQConfig`):
they condition and order the factorization only, so the state's Hessian stays undamped for the
metrics and the stored column order never changes.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import attrs
import torch

from ..errors import ConfigError, CqError
from ..kernels import Backend
from ..pipeline import Pipeline, pipeline, stage
from ..state import LayerState, PerGroup, PerRow, PerTensor, record
from .checks import check_finite
from .convrot import ConvRotConfig, convrot
from .hessian import DampingConfig, feedback_round, quadratic_forms
from .incoherence import Incoherence, IncoherenceConfig, incoherence, undo_incoherence
from .ldlq import LDLQConfig, ldlq, ldlq_solve
from .rounding import RoundConfig, round_to_nearest, working_dequantized
from .hessian_shrink import HessianShrinkConfig, shrink_hessian, shrink_validator
from .upstream import UpstreamConfig, strength_validator, upstream_correct
from .scale_search import ScaleSearchConfig, scale_search
from .scales import ScaleConfig, absmax_scale

__all__ = ["QuIPConfig", "QuIPLDLQConfig", "quip_config_from_legacy", "quip_pipeline", "quip_ldlq",
           "store_transformed", "requant_metrics", "quip_extra_tensors", "QUIP_TRANSFORMED_FORMAT", "KIND_CODES"]

#: Format label of a layer stored in the two-sided transformed basis (needs a custom loader).
QUIP_TRANSFORMED_FORMAT = "int8_quip_transformed"
#: Codes of the Kronecker factor kinds in ``<L>.quip_kron_out`` / ``<L>.quip_kron_in``.
KIND_CODES = {"sylvester": 0, "paley": 1, "random": 2}

_OUTPUTS = ("convrot", "requant", "transformed")


def _bool(instance, attribute, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name}={value!r} must be True or False")


def _pos_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{attribute.name}={value!r} must be a positive int")


def _seed(instance, attribute, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"seed={value!r} must be None (means 0) or an int >= 0")


def _percdamp(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"percdamp={value!r} must be a finite number >= 0, e.g. 0.01")


def _scheme(instance, attribute, value):
    if value not in ("tensor", "block"):
        raise ConfigError(f"requant_scheme={value!r} must be 'tensor' or 'block'")


def _output(instance, attribute, value):
    if value is not None and value not in _OUTPUTS:
        raise ConfigError(f"output={value!r} must be one of {list(_OUTPUTS)} (or None: 'transformed' when "
                          "store_transformed=True, else 'convrot')")


def _groupsize(instance, attribute, value):
    ConvRotConfig(groupsize=value)  # raises ConfigError with the allowed values


@attrs.frozen
class QuIPConfig:
    """Every QuIP option; names follow the reference (``quip_*`` flags, ``QuIPInt8Converter``).

    ``actorder``: LDLQ visits columns by decreasing ``diag(H)``. ``use_hadamard``: randomized
    Hadamard incoherence (two-sided outputs); ``False`` uses seeded random orthogonal factors, which
    ComfyUI cannot run, so it needs ``output="requant"`` or ``"transformed"``. ``seed``: seeds the
    two-sided transform; ``None`` means 0 (the reference used the global RNG: not reproducible).
    ``store_transformed``: same as ``output="transformed"``. ``requant_scheme`` /
    ``requant_per_row``: the re-quantization scales of ``output="requant"`` (``"tensor"`` with
    per-row ``[N, 1]`` or one scale; ``"block"``: 1×``block_size`` groups, falling back to per-row
    when K is not a multiple). ``checkpointed`` (+ ``checkpoint_threshold``, ``checkpoint_segments``):
    for K ≥ threshold, run LDLQ over row segments sharing one factorization — smaller working
    memory and the same codes (rows are independent in LDLQ; see :func:`quip_ldlq`). ``block_size``: LDLQ's lazy block and the
    requant group. ``percdamp``: damping relative to the mean diagonal. ``output``: see the module
    docstring; ``None`` → ``"transformed"`` if ``store_transformed`` else ``"convrot"``.
    ``convrot_groupsize``: ``"auto"`` (256 when K allows) or a power of 4. ``rescale`` / ``permute``:
    QuIP's diagonal rescaling and random permutation on the two-sided outputs. ``lazy_batch``:
    LDLQ's lazy block updates (``False``: the textbook loop; same codes, slower).
    ``hessian_shrink`` (ConvRot output): ``β`` of ``(1 − β)·H + β·diag(H)`` before LDLQ (``"auto"``:
    ``min(0.3, 0.7·K/T)`` for ``T`` calibration tokens, see :func:`~cq.transforms.hessian_shrink.auto_beta`;
    0: the raw Hessian). ``data_free_scale_search`` (ConvRot output): without a Hessian, per-row clipping by weight
    MSE instead of absmax scales. ``upstream_strength``: with a sequential calibration file (its
    ``upstream`` cross terms), the fraction of the GPTAQ-style step toward the float model's output taken
    before rounding (:func:`~cq.transforms.upstream.upstream_correct`; 0.5; 0: off); files without it
    are unaffected. All measured on held-out data (README, "Quality and speed").

    Example:
        >>> QuIPConfig().resolved_output, QuIPConfig(store_transformed=True).resolved_output
        ('convrot', 'transformed')
    """

    actorder: bool = attrs.field(default=True, validator=_bool)
    use_hadamard: bool = attrs.field(default=True, validator=_bool)
    seed: int | None = attrs.field(default=None, validator=_seed)
    store_transformed: bool = attrs.field(default=False, validator=_bool)
    requant_scheme: Literal["tensor", "block"] = attrs.field(default="tensor", validator=_scheme)
    requant_per_row: bool = attrs.field(default=True, validator=_bool)
    checkpointed: bool = attrs.field(default=False, validator=_bool)
    checkpoint_threshold: int = attrs.field(default=8192, validator=_pos_int)
    checkpoint_segments: int = attrs.field(default=4, validator=_pos_int)
    block_size: int = attrs.field(default=128, validator=_pos_int)
    percdamp: float = attrs.field(default=0.01, validator=_percdamp)
    output: Literal["convrot", "requant", "transformed"] | None = attrs.field(default=None, validator=_output)
    convrot_groupsize: int | Literal["auto"] = attrs.field(default="auto", validator=_groupsize)
    rescale: bool = attrs.field(default=True, validator=_bool)
    permute: bool = attrs.field(default=True, validator=_bool)
    lazy_batch: bool = attrs.field(default=True, validator=_bool)
    hessian_shrink: float | str = attrs.field(default="auto", validator=shrink_validator)
    upstream_strength: float = attrs.field(default=0.5, validator=strength_validator)
    data_free_scale_search: bool = attrs.field(default=True, validator=_bool)

    def __attrs_post_init__(self):
        if self.store_transformed and self.output not in (None, "transformed"):
            raise ConfigError(f"store_transformed=True conflicts with output={self.output!r}; drop one of them "
                              "(store_transformed means output='transformed')")
        if not self.use_hadamard and self.resolved_output == "convrot":
            raise ConfigError("use_hadamard=False (random orthogonal incoherence) cannot be stored as ConvRot, "
                              "the only rotation ComfyUI runs; use output='requant' or 'transformed', or keep "
                              "use_hadamard=True")

    @property
    def resolved_output(self) -> str:
        if self.output is not None:
            return self.output
        return "transformed" if self.store_transformed else "convrot"

    @property
    def effective_seed(self) -> int:
        return 0 if self.seed is None else self.seed

    def ldlq_config(self, backend: Backend | str = Backend.AUTO) -> LDLQConfig:
        return LDLQConfig(damping=DampingConfig(percdamp=float(self.percdamp)), actorder=self.actorder,
                          block_size=self.block_size, lazy_batch=self.lazy_batch, backend=backend)

    def incoherence_config(self) -> IncoherenceConfig:
        # A stored transformed layer has no slot for the permutation (it only orders LDLQ; undone
        # before storing); the rescale factors are stored (``<L>.quip_col_scale``).
        return IncoherenceConfig(seed=self.effective_seed, use_hadamard=self.use_hadamard,
                                 rescale=self.rescale, permute=self.permute)

    def requant_granularity(self):
        if self.requant_scheme == "block":
            return PerGroup(self.block_size)
        return PerRow() if self.requant_per_row else PerTensor()


def quip_config_from_legacy(*, block_size: int = 128, actorder: bool = True, hadamard: bool = True,
                            seed: int | None = None, store_transformed: bool = False, requant_scheme: str = "tensor",
                            requant_tensor_per_row: bool = True, checkpointed: bool = False,
                            checkpoint_threshold: int = 8192, checkpoint_segments: int = 4,
                            output: str | None = None) -> QuIPConfig:
    """:class:`QuIPConfig` from the reference's ``quip_*`` arguments (names without the prefix).

    The output is cq's ComfyUI-native ``"convrot"`` unless ``store_transformed`` (→ ``"transformed"``)
    or ``output`` says otherwise. ``hadamard=False`` (the reference's random-orthogonal incoherence)
    cannot be stored as ConvRot, and non-default ``requant_scheme`` / ``requant_tensor_per_row`` ask
    for re-quantization explicitly: both select the reference's ``"requant"`` output, with a
    ``UserWarning`` that it keeps none of QuIP's gain (so no legacy option is silently ignored).

    Example:
        >>> quip_config_from_legacy(seed=3).resolved_output
        'convrot'
    """
    if output is None and not store_transformed:
        why = None
        if not hadamard:
            why = ("quip_hadamard=False: random-orthogonal incoherence cannot be stored as ConvRot (ComfyUI only "
                   "rotates activations with its regular Hadamard)")
        elif requant_scheme != "tensor" or not requant_tensor_per_row:
            why = (f"quip_requant_scheme={requant_scheme!r}, quip_requant_tensor_per_row={requant_tensor_per_row!r} "
                   "ask for the reference's re-quantized output")
        if why:
            warnings.warn(f"{why}, so these layers are re-quantized in the original basis like the reference does, "
                          "which keeps none of QuIP's gain; leave the quip_hadamard/quip_requant_* options at their "
                          "defaults for the ComfyUI-native ConvRot output", UserWarning, stacklevel=2)
            output = "requant"
    return QuIPConfig(actorder=actorder, use_hadamard=hadamard, seed=seed, store_transformed=store_transformed,
                      requant_scheme=requant_scheme, requant_per_row=requant_tensor_per_row,
                      checkpointed=checkpointed, checkpoint_threshold=checkpoint_threshold,
                      checkpoint_segments=checkpoint_segments, block_size=block_size, output=output)


@attrs.frozen
class QuIPLDLQConfig:
    """:func:`quip_ldlq`'s config: the LDLQ config plus the row segmentation (``segments=1``: none)."""

    ldlq: LDLQConfig = attrs.field(factory=LDLQConfig, validator=attrs.validators.instance_of(LDLQConfig))
    segments: int = attrs.field(default=1, validator=_pos_int)
    threshold: int = attrs.field(default=8192, validator=_pos_int)


def _segmented_solve(segments: int):
    def solve(wt: torch.Tensor, s32: torch.Tensor, lower_rev: torch.Tensor, block_size: int,
              inner: int, *, backend: Backend | str = Backend.AUTO) -> torch.Tensor:
        # wt is [K, N]: LDLQ's feedback runs down the K axis independently for every weight row
        # (column of wt), so row segments sharing one factorization give the same codes while the
        # working copies (targets, error blocks) are N/segments wide.
        n = wt.shape[1]
        step = -(-n // segments)
        parts = []
        for a in range(0, n, step):
            b = min(a + step, n)
            s_part = s32[:, a:b].contiguous()
            parts.append(ldlq_solve(wt[:, a:b].contiguous(), s_part, lower_rev, block_size, inner, backend=backend))
        return torch.cat(parts, dim=1)

    return solve


def quip_ldlq(state: LayerState, *, cfg: QuIPLDLQConfig = QuIPLDLQConfig()) -> LayerState:
    """:func:`~cq.transforms.ldlq.ldlq`, run over ``cfg.segments`` row segments when K ≥ ``cfg.threshold``.

    This is cq's ``quip_checkpointed``: one Cholesky factorization, rows quantized a segment at a
    time. LDLQ's error feedback only mixes columns *within* a row, so the codes equal the
    unsegmented run (unlike the reference's approximate column segmentation; checked code for code
    in ``tests/test_quip.py``). Memory: LDLQ's per-row working buffers (its target copy of the
    weight) are ``N/segments`` rows instead of ``N``; the factorization and one float copy of the
    weight are shared, so the peak drops by about one weight-sized buffer.
    """
    k = state.shape[1]
    if cfg.segments <= 1 or k < cfg.threshold or state.hessian is None:
        return ldlq(state, cfg=cfg.ldlq)
    segments = min(cfg.segments, state.shape[0])
    out = feedback_round(state, cfg.ldlq, stage="ldlq", solve=_segmented_solve(segments))
    return record(out, "quip_ldlq", cfg, note=f"LDLQ over {segments} row segments (checkpointed, exact)")


def store_transformed(state: LayerState) -> LayerState:
    """Finish a two-sided QuIP state for storage: undo the column permutation, set the format label.

    The permutation only chose LDLQ's column order; per-row scales do not depend on it, so the
    stored codes are ``round(U·W·diag(d)·Vᵀ / s)`` in natural column order and the layer is
    described by :func:`quip_extra_tensors` alone.
    """
    inc = state.basis
    if not isinstance(inc, Incoherence) or state.codes is None:
        raise CqError(f"{state.name}: store_transformed needs a quantized state from the incoherence stage")
    if not isinstance(state.granularity, (PerRow, PerTensor)):
        raise CqError(f"{state.name}: store_transformed supports per-row or tensor scales, got {state.granularity!r}")
    changes = {}
    if inc.perm is not None:
        inv = torch.argsort(inc.perm)
        changes = dict(codes=state.codes[:, inv].contiguous(), weight=state.weight[:, inv].contiguous())
        if state.hessian is not None:
            changes["hessian"] = state.hessian[inv][:, inv].contiguous()
        inc = attrs.evolve(inc, perm=None)
    return record(state, "store_transformed", None, basis=inc, format=QUIP_TRANSFORMED_FORMAT,
                  **changes)


def requant_metrics(state: LayerState) -> LayerState:
    """After ``output="requant"``: move LDLQ's ``rel_out_h`` to ``rel_out_h_quip`` and measure the stored layer."""
    metrics = dict(state.metrics)
    if "rel_out_h" in metrics:
        metrics["rel_out_h_quip"] = metrics.pop("rel_out_h")
    if state.hessian is not None and state.codes is not None:
        orig = (state.original if state.original is not None else state.weight).to(torch.float32)
        sig, loss = quadratic_forms([orig, orig - working_dequantized(state)], state.hessian)
        metrics["rel_out_h"] = math.sqrt(max(loss, 0.0) / sig) if sig > 0 else 0.0
    return attrs.evolve(record(state, "requant_metrics", None), metrics=metrics)


def quip_pipeline(cfg: QuIPConfig = QuIPConfig(), *, backend: Backend | str = Backend.AUTO) -> Pipeline:
    """The QuIP pipeline for ``cfg.resolved_output``, as named, inspectable stages; ``backend`` runs its rounding.

    Example:
        >>> quip_pipeline().names
        ('check_finite', 'shrink_hessian', 'upstream_correct', 'convrot', 'scale', 'scale_search', 'ldlq')
        >>> quip_pipeline(QuIPConfig(output="requant")).names
        ('check_finite', 'upstream_correct', 'incoherence', 'scale', 'ldlq', 'undo_incoherence', 'requant_scale', 'requant_round', 'requant_metrics')
        >>> quip_pipeline(QuIPConfig(store_transformed=True)).names
        ('check_finite', 'upstream_correct', 'incoherence', 'scale', 'ldlq', 'store_transformed')
    """
    out = cfg.resolved_output
    segments = cfg.checkpoint_segments if cfg.checkpointed else 1
    ldlq_stage = stage(quip_ldlq, QuIPLDLQConfig(ldlq=cfg.ldlq_config(backend), segments=segments,
                                                 threshold=cfg.checkpoint_threshold), name="ldlq")
    scale_stage = stage(absmax_scale, ScaleConfig(PerRow()), name="scale")
    # A sequential calibration file's cross terms (no-op without them): fit the float model's output.
    upstream = ([stage(upstream_correct, UpstreamConfig(strength=cfg.upstream_strength), name="upstream_correct")]
                if cfg.upstream_strength > 0 else [])
    if out == "convrot":
        # With data: the Hessian shrunk toward its diagonal (it generalises better to unseen inputs: on
        # held-out MiniLM sentences weight-only 1−cos 6.9e-5 → 5.5e-5). Without data: per-row clipping
        # chosen by weight MSE (beats absmax RTN under W8A8: 3.12e-4 → 2.82e-4). See the README table.
        stages = [check_finite]
        if cfg.hessian_shrink != 0:
            stages.append(stage(shrink_hessian, HessianShrinkConfig(cfg.hessian_shrink), name="shrink_hessian"))
        stages += upstream
        stages += [stage(convrot, ConvRotConfig(cfg.convrot_groupsize), name="convrot"), scale_stage]
        if cfg.data_free_scale_search:
            stages.append(stage(scale_search, ScaleSearchConfig(only_without_hessian=True), name="scale_search"))
        return pipeline(*stages, ldlq_stage)
    head = [check_finite, *upstream, stage(incoherence, cfg.incoherence_config(), name="incoherence"), scale_stage, ldlq_stage]
    if out == "transformed":
        return pipeline(*head, stage(store_transformed, name="store_transformed"))
    return pipeline(*head, stage(undo_incoherence, name="undo_incoherence"),
                    stage(absmax_scale, ScaleConfig(cfg.requant_granularity()), name="requant_scale"),
                    stage(round_to_nearest, RoundConfig(backend), name="requant_round"),
                    stage(requant_metrics, name="requant_metrics"))


def quip_extra_tensors(state: LayerState) -> dict[str, torch.Tensor]:
    """The tensors a ``"transformed"`` QuIP layer stores next to ``.weight`` / ``.weight_scale``.

    With ``M_u = diag(sign_row)·F_u`` and ``M_v = diag(sign_col)·F_v`` the stored codes ``q`` and
    scale ``s`` reconstruct the original-basis weight as
    ``W = (M_u · (q ⊙ s) · M_vᵀ) / col_scale`` (division per column, only if ``.quip_col_scale`` is
    present), i.e. ``diag(sign_row) · F_u · (q⊙s) · F_vᵀ · diag(sign_col)``. Keys (``L`` = layer):

    * ``L.hadamard_quip``: int8 0-d, 1 when both ``F`` are Hadamard-based, 0 for random orthogonals;
    * ``L.hadamard_size_out`` / ``L.hadamard_size_in``: int32 0-d, N and K (no padding in cq);
    * ``L.sign_row`` float32 ``[N]``, ``L.sign_col`` float32 ``[K]``: the ±1 signs;
    * only when a side's ``F`` is not the natural-order Sylvester matrix ``S_n`` (which the
      reference's loader assumes): ``L.quip_kron_out`` / ``L.quip_kron_in`` int32 ``[m, 2]`` rows
      ``(kind, size)`` of its Kronecker factors ``F = F₀ ⊗ F₁ ⊗ …`` (kind 0 Sylvester, rebuilt from its
      definition; 1 Paley, stored as ``L.quip_factor_out.i`` int8 ±1, divided by √size; 2 random
      orthogonal, stored as ``L.quip_factor_out.i`` float32);
    * ``L.quip_col_scale`` float32 ``[K]``: the diagonal rescaling ``d``, when used.

    For power-of-two N and K without rescaling the file is exactly the reference's layout, which
    its formula ``W = diag(sign_row)·H·(q⊙s)·H·diag(sign_col)`` reconstructs.
    """
    inc = state.basis
    if not isinstance(inc, Incoherence) or state.format != QUIP_TRANSFORMED_FORMAT:
        raise CqError(f"{state.name}: quip_extra_tensors needs a state finished by store_transformed "
                      f"(format {QUIP_TRANSFORMED_FORMAT!r}), got format {state.format!r}")
    if inc.perm is not None:
        raise CqError(f"{state.name}: the column permutation must be undone before storing (store_transformed)")
    name = state.name
    n, k = state.shape
    hadamard = all(kind != "random" for kind in inc.u.kinds + inc.v.kinds)
    out = {
        f"{name}.hadamard_quip": torch.tensor(1 if hadamard else 0, dtype=torch.int8),
        f"{name}.hadamard_size_out": torch.tensor(n, dtype=torch.int32),
        f"{name}.hadamard_size_in": torch.tensor(k, dtype=torch.int32),
        f"{name}.sign_row": _signs(inc.u, n),
        f"{name}.sign_col": _signs(inc.v, k),
    }
    for side, t in (("out", inc.u), ("in", inc.v)):
        if t.is_sylvester:
            continue
        out[f"{name}.quip_kron_{side}"] = torch.tensor(
            [[KIND_CODES[kind], int(f.shape[0])] for kind, f in zip(t.kinds, t.factors)], dtype=torch.int32)
        for i, (kind, f) in enumerate(zip(t.kinds, t.factors)):
            if kind == "paley":
                out[f"{name}.quip_factor_{side}.{i}"] = torch.round(f * math.sqrt(f.shape[0])).to(torch.int8)
            elif kind == "random":
                out[f"{name}.quip_factor_{side}.{i}"] = f.to(torch.float32).contiguous()
    if inc.d is not None:
        out[f"{name}.quip_col_scale"] = inc.d.to(torch.float32).contiguous()
    return out


def _signs(t, n: int) -> torch.Tensor:
    if t.signs is None:
        return torch.ones(n, dtype=torch.float32)
    return t.signs.to(torch.float32).contiguous()
