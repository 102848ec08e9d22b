"""The calibration file format, its reader and writer, and the reference tool's synthetic "calibration".

Format ``cq-calibration-1`` (a safetensors file). For each layer ``L`` (its weight key without
``.weight``, e.g. ``model.diffusion_model.blocks.0.attn.qkv``):

========================  =================  ==============================================
tensor                    dtype, shape       meaning
========================  =================  ==============================================
``<L>.hessian``           float32 [K, K]     ``H = 2/T · XᵀX`` over the ``T`` input rows ``X``
``<L>.input_absmax``      float32 [K]        ``max_t |X[t, k]|`` (SmoothQuant)
``<L>.input_mean``        float32 [K]        ``mean_t X[t, k]`` (bias correction)
``<L>.samples``           int64 ``()``       ``T`` for this layer (only when layers differ)
``<L>.upstream``          float32 [K, K]     ``D = 2/T · (X − X̃)ᵀX̃`` (optional; sequential capture)
========================  =================  ==============================================

With ``<L>.upstream`` (written from :func:`cq.sequential.capture_sequential`), ``X̃`` are the layer's
inputs in the model whose earlier layers are quantized, ``H`` comes from them, and GPTQ/QuIP fit the
float model's output (:func:`cq.transforms.upstream.upstream_correct`). Files without it give the
published algorithms.

Header metadata: ``format = "cq-calibration-1"``, ``samples = T`` (decimal string). Layers absent
from the file fall back to ``H = I`` (GPTQ/LDLQ then equal round-to-nearest) with a note.

The reference tool's files are read too (no Hessian, so ``H = I``): ``.json`` as
``{L: {"channel_max": [...], "channel_mean": [...], "input_scale": x}}`` or ``{L: x}``, and
safetensors with ``<L>.channel_max`` / ``<L>.channel_mean`` / ``<L>.input_scale``. Its
``channel_mean`` is ``mean |x|`` (not the signed mean), so it is exposed as
:meth:`Calibration.input_abs_mean`, never as :meth:`Calibration.input_mean`.

Example:
    >>> import tempfile, os, torch
    >>> from cq.calibrate import capture
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    >>> stats = capture(model, [torch.randn(8, 3)], name_map="blocks.")
    >>> path = os.path.join(tempfile.mkdtemp(), "calib.safetensors")
    >>> _ = save_calibration(path, stats)
    >>> cal = load_calibration(path)
    >>> cal.layers, cal.samples, tuple(cal.hessian("blocks.0").shape), cal.hessian("missing") is None
    (('blocks.0',), 8, (3, 3), True)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import attrs
import torch

from ..calibrate import HessianStats, hessian_finalize, hessian_init, hessian_update
from ..errors import ConfigError, InputError
from ..state import LayerState

__all__ = [
    "FORMAT",
    "Calibration",
    "save_calibration",
    "load_calibration",
    "synthetic_hessian",
    "attach_calibration",
]

FORMAT = "cq-calibration-1"

_CQ_SUFFIXES = ("hessian", "input_absmax", "input_mean", "samples", "upstream")
_REF_SUFFIXES = ("channel_max", "channel_mean", "input_scale")
#: Optional per-basis statistics of ComfyUI's W8A8 activation path (cq.calibrate.ActivationStats):
#: ``<L>.w8a8_{err_sq,err_x,err_mean}_g<G>`` float32 [K], G = ConvRot group size (0: unrotated).
#: Files without them load as before; the [K, K] X̃ᵀX̃ / X̃ᵀX stay in memory only (measured: they
#: overfit, see cq.transforms.w8a8_round).
_W8A8_KEY = re.compile(r"^(?P<layer>.+)\.(?P<suffix>w8a8_(?:err_sq|err_x|err_mean)_g\d+)$")
_W8A8_FIELDS = ("err_sq", "err_x", "err_mean")


# ---------------------------------------------------------------------------------------------
# Writing


def _check_stats(layer: str, st: HessianStats) -> int:
    if not isinstance(st, HessianStats):
        raise InputError(f"save_calibration: {layer!r} must map to a HessianStats (from cq.calibrate), "
                         f"got {type(st).__name__}")
    h = st.hessian
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise InputError(f"save_calibration: {layer}.hessian must be square [K, K], got {tuple(h.shape)}")
    k = h.shape[0]
    for what, t in (("input_absmax", st.input_absmax), ("input_mean", st.input_mean)):
        if tuple(t.shape) != (k,):
            raise InputError(f"save_calibration: {layer}.{what} must be [{k}] to match the Hessian, "
                             f"got {tuple(t.shape)}")
    if isinstance(st.samples, bool) or not isinstance(st.samples, int) or st.samples <= 0:
        raise InputError(f"save_calibration: {layer}.samples must be a positive int, got {st.samples!r}")
    up = getattr(st, "upstream", None)
    if up is not None and tuple(up.shape) != (k, k):
        raise InputError(f"save_calibration: {layer}.upstream must be [{k}, {k}] to match the Hessian, "
                         f"got {tuple(up.shape)}")
    return st.samples


def save_calibration(path: str | os.PathLike, stats: Mapping[str, HessianStats], *,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``stats`` (``{layer: HessianStats}``) as a ``cq-calibration-1`` file, atomically.

    The file is written to a temporary name in the target folder and renamed over ``path`` only
    when complete, so a crash never leaves a partial file. ``metadata`` adds free-form header
    entries (``format`` and ``samples`` are reserved). Returns the path written.
    """
    if not stats:
        raise InputError("save_calibration: no layers to save; capture() returned nothing "
                         "(did the inputs reach any nn.Linear?)")
    tensors: dict[str, torch.Tensor] = {}
    samples = {layer: _check_stats(layer, st) for layer, st in stats.items()}
    uniform = len(set(samples.values())) == 1
    for layer, st in stats.items():
        tensors[f"{layer}.hessian"] = st.hessian.detach().to(torch.float32).cpu().contiguous()
        tensors[f"{layer}.input_absmax"] = st.input_absmax.detach().to(torch.float32).cpu().contiguous()
        tensors[f"{layer}.input_mean"] = st.input_mean.detach().to(torch.float32).cpu().contiguous()
        if not uniform:
            tensors[f"{layer}.samples"] = torch.tensor(st.samples, dtype=torch.int64)
        if getattr(st, "upstream", None) is not None:
            tensors[f"{layer}.upstream"] = st.upstream.detach().to(torch.float32).cpu().contiguous()
        for g, act in (getattr(st, "w8a8", None) or {}).items():
            for field in _W8A8_FIELDS:
                tensors[f"{layer}.w8a8_{field}_g{int(g)}"] = getattr(act, field).detach().to(torch.float32).cpu().contiguous()
    # One HessianStats saved under two names (or views of one buffer) would share memory, which
    # safetensors refuses with a RuntimeError; give each repeat its own copy.
    seen: set[int] = set()
    for name, t in tensors.items():
        if t.numel() and t.data_ptr() in seen:
            tensors[name] = t.clone()
        seen.add(tensors[name].data_ptr())
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    reserved = sorted({"format", "samples"} & set(meta))
    if reserved:
        raise ConfigError(f"save_calibration: metadata keys {reserved} are reserved; rename them")
    meta["format"] = FORMAT
    meta["samples"] = str(max(samples.values()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .writer import write_safetensors

    write_safetensors(path, tensors, metadata=meta)  # atomic: temp file, verified, renamed into place
    return path


# ---------------------------------------------------------------------------------------------
# Reading


def _split(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    for suffix in suffixes:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


@attrs.frozen(eq=False)
class Calibration:
    """A calibration file opened for lazy per-layer reads (see :func:`load_calibration`).

    ``kind`` is ``"cq"`` (Hessians) or ``"reference"`` (channel statistics only). Accessors
    return ``None`` for layers or entries the file does not have.
    """

    path: Path
    kind: str
    samples: int | None
    entries: Mapping[str, Mapping[str, Any]]  # layer -> {suffix: tensor key (safetensors) or tensor (json)}
    metadata: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(sorted(self.entries))

    def __contains__(self, layer: str) -> bool:
        return layer in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, layer: str, suffix: str) -> torch.Tensor | None:
        entry = self.entries.get(layer, {}).get(suffix)
        if entry is None:
            return None
        if isinstance(entry, torch.Tensor):
            return entry.clone()
        from .loader import UnifiedSafetensorsLoader

        try:
            with UnifiedSafetensorsLoader(self.path, low_memory=True) as f:
                return f.get_tensor(entry)
        except (OSError, KeyError) as exc:
            raise InputError(f"{self.path}: cannot read {entry!r}: {exc}; the file changed or is damaged, "
                             "write it again with save_calibration") from None

    def _vector(self, layer: str, suffix: str) -> torch.Tensor | None:
        t = self._read(layer, suffix)
        if t is None:
            return None
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise InputError(f"{self.path}: {layer}.{suffix} must hold finite floats; recapture this layer")
        return t.to(torch.float32)

    def _matrix(self, layer: str, suffix: str, k: int | None, fallback: str) -> torch.Tensor | None:
        """A ``[K, K]`` entry as float32, checked for shape, dtype and NaN/Inf (``fallback``: the way out)."""
        t = self._read(layer, suffix)
        if t is None:
            return None
        if k is not None and tuple(t.shape) != (k, k):
            raise InputError(f"{self.path}: {layer}.{suffix} is {list(t.shape)} but the layer has in_features={k}; "
                             "the calibration file belongs to another model (recapture it)")
        if not t.is_floating_point():
            raise InputError(f"{self.path}: {layer}.{suffix} must be float, got {t.dtype}")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise InputError(f"{self.path}: {layer}.{suffix} has {bad} NaN/Inf entries (it must be finite); "
                             f"recapture this layer (its inputs overflowed) {fallback}")
        return t.to(torch.float32)

    def _check_length(self, layer: str, suffix: str, t: torch.Tensor | None, k: int | None) -> None:
        if t is not None and k is not None and tuple(t.shape) != (k,):
            raise InputError(f"{self.path}: {layer}.{suffix} has {t.numel()} values but the layer has "
                             f"in_features={k}; the calibration file belongs to another model (recapture it)")

    def _reference_hessian(self, layer: str, k: int | None) -> torch.Tensor | None:
        # The reference's files hold per-channel statistics, no Hessian. Their diagonal is still
        # information: H = diag(m²) weighs each input channel by its typical magnitude m (the
        # mean |x| when present, else the max |x|). Off-diagonal terms are unknown and taken as 0.
        mean, peak = self.input_abs_mean(layer), self.input_absmax(layer)
        self._check_length(layer, "channel_mean", mean, k)
        self._check_length(layer, "channel_max", peak, k)
        if mean is not None and peak is not None and mean.shape != peak.shape:
            raise InputError(f"{self.path}: {layer}.channel_mean has {mean.numel()} values and "
                             f"{layer}.channel_max {peak.numel()}; both must have one value per input channel")
        m = mean if mean is not None else peak
        if m is None:
            return None  # only an input_scale: nothing per channel
        if bool((m < 0).any()):
            raise InputError(f"{self.path}: {layer}.channel_{'mean' if mean is not None else 'max'} has negative "
                             "values; it must hold magnitudes (|x| statistics)")
        return torch.diag(m.to(torch.float32) ** 2)

    def hessian(self, layer: str, *, k: int | None = None) -> torch.Tensor | None:
        """``H`` [K, K] float32 for ``layer``, validated (finite, symmetric), or ``None``.

        For the reference's files (channel statistics only) this is the diagonal
        ``diag(channel_mean²)`` (``channel_max²`` when there is no mean); see :meth:`hessian_kind`.
        ``k``: the layer's in_features; a statistic of another length is an :class:`InputError`
        naming the layer and the entry.

        Example:
            >>> import json, tempfile, os
            >>> p = os.path.join(tempfile.mkdtemp(), "ref.json")
            >>> with open(p, "w") as f:
            ...     json.dump({"blocks.0": {"channel_max": [1.0, 3.0]}}, f)
            >>> load_calibration(p).hessian("blocks.0", k=2).tolist()
            [[1.0, 0.0], [0.0, 9.0]]
        """
        if self.kind == "reference":
            return self._reference_hessian(layer, k)
        h = self._matrix(layer, "hessian", k, "or delete the entry to fall back to H = I")
        if h is None:
            return None
        scale = float(h.abs().max()) if h.numel() else 0.0
        asym = float((h - h.t()).abs().max()) if h.numel() else 0.0
        if asym > 1e-5 * max(scale, 1e-30):
            raise InputError(f"{self.path}: {layer}.hessian is not symmetric (max |H - Hᵀ| = {asym:.3g}, "
                             f"max |H| = {scale:.3g}); a Hessian 2/T·XᵀX is symmetric: recapture this layer")
        return h

    def upstream(self, layer: str, *, k: int | None = None) -> torch.Tensor | None:
        """The sequential calibration's cross term ``2/T·(X − X̃)ᵀX̃`` of ``layer`` (float32 ``[K, K]``), or ``None``."""
        return self._matrix(layer, "upstream", k, "or delete the entry to run without the correction")

    def hessian_kind(self, layer: str) -> str | None:
        """What :meth:`hessian` returns for ``layer``: ``"captured"`` (a cq file), ``"diagonal"`` (the
        reference's channel statistics), or ``None`` (no usable entry).
        """
        if layer not in self.entries:
            return None
        if self.kind == "cq":
            return "captured"
        return "diagonal" if {"channel_max", "channel_mean"} & set(self.entries[layer]) else None

    def input_absmax(self, layer: str) -> torch.Tensor | None:
        """Per-channel ``max |x|`` [K] (the reference's ``channel_max``), or ``None``."""
        return self._vector(layer, "input_absmax" if self.kind == "cq" else "channel_max")

    def input_mean(self, layer: str) -> torch.Tensor | None:
        """Per-channel signed mean of the inputs [K] (cq files only), or ``None``."""
        return self._vector(layer, "input_mean") if self.kind == "cq" else None

    def input_abs_mean(self, layer: str) -> torch.Tensor | None:
        """The reference's ``channel_mean`` (``mean |x|``) [K], or ``None``."""
        return self._vector(layer, "channel_mean") if self.kind == "reference" else None

    def input_scale(self, layer: str) -> float | None:
        """The reference's static ``input_scale`` (one number), or ``None``."""
        t = self._vector(layer, "input_scale") if self.kind == "reference" else None
        if t is None:
            return None
        if t.numel() != 1:
            raise InputError(f"{self.path}: {layer}.input_scale must hold one number, got shape {tuple(t.shape)}")
        return float(t.reshape(()))

    def w8a8_stats(self, layer: str) -> dict[int, Any]:
        """``{ConvRot group size (0: unrotated): ActivationStats}`` stored for ``layer`` (``{}`` if none).

        Only the ``[K]`` diagonals are stored, so ``hessian`` and ``cross`` are ``None``.
        """
        from ..calibrate import ActivationStats

        entry = self.entries.get(layer, {})
        groups = sorted({int(s.rsplit("_g", 1)[1]) for s in entry if s.startswith("w8a8_")})
        out = {}
        for g in groups:
            vecs = {f: self._read(layer, f"w8a8_{f}_g{g}") for f in _W8A8_FIELDS}
            missing = [f for f, v in vecs.items() if v is None]
            if missing:
                raise InputError(f"{self.path}: {layer} has W8A8 statistics for group size {g} without "
                                 f"{['w8a8_' + f + f'_g{g}' for f in missing]}; recapture with capture(..., w8a8=...)")
            shapes = {tuple(v.shape) for v in vecs.values()}
            if len(shapes) != 1 or len(next(iter(shapes))) != 1:
                raise InputError(f"{self.path}: {layer}.w8a8_*_g{g} must all be [K] vectors, got {sorted(shapes)}")
            out[g] = ActivationStats(groupsize=g, hessian=None, cross=None, samples=self.layer_samples(layer) or 0,
                                     **{f: v.to(torch.float32) for f, v in vecs.items()})
        return out

    def layer_samples(self, layer: str) -> int | None:
        """``T`` for ``layer``: its own ``<L>.samples`` if stored, else the file's ``samples``."""
        t = self._read(layer, "samples") if self.kind == "cq" else None
        return int(t) if t is not None else (self.samples if layer in self.entries else None)


def _load_reference_json(path: Path) -> Calibration:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # "[[[[…" deeper than the interpreter's limit (found by fuzzing, issue 8.9)
        raise InputError(f"{path}: nests too deeply to be a JSON calibration file; expected "
                         '{"layer": {"channel_max": [...], "input_scale": x}} or {"layer": x}') from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a valid JSON calibration file ({exc}); expected "
                         '{"layer": {"channel_max": [...], "input_scale": x}} or {"layer": x}') from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: a JSON calibration file must be a non-empty object keyed by layer name")
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for layer, value in data.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = {"input_scale": value}
        if not isinstance(value, dict):
            raise InputError(f"{path}: entry {layer!r} must be a number (input_scale) or an object with "
                             f"channel_max / channel_mean / input_scale, got {type(value).__name__}")
        entry = {}
        for suffix, v in value.items():
            if suffix not in _REF_SUFFIXES:
                continue
            try:
                t = torch.tensor(v, dtype=torch.float32)
            except (TypeError, ValueError):
                raise InputError(f"{path}: {layer}.{suffix} must be a number or a list of numbers") from None
            if suffix != "input_scale" and t.ndim != 1:
                raise InputError(f"{path}: {layer}.{suffix} must be a flat list [K], got shape {tuple(t.shape)}")
            entry[suffix] = t
        if entry:
            entries[layer] = entry
    if not entries:
        raise InputError(f"{path}: no channel_max / channel_mean / input_scale entries found")
    return Calibration(path=path, kind="reference", samples=None, entries=entries)


def _load_safetensors(path: Path) -> Calibration:
    from .loader import read_header

    try:
        header = read_header(path)  # the strict reader: every offset, length and dtype checked
    except InputError as exc:
        raise InputError(f"not a readable safetensors calibration file ({exc}); pass a file written by cq "
                         "(save_calibration) or the reference's .json/.safetensors format") from None
    meta = dict(header.metadata)
    shapes = {key: tuple(info.shape) for key, info in header.tensors.items()}
    fmt = meta.get("format")
    is_cq = fmt == FORMAT or (fmt is None and any(_split(k, ("hessian",)) for k in shapes))
    if fmt is not None and fmt != FORMAT and any(_split(k, ("hessian",)) for k in shapes):
        raise InputError(f"{path}: calibration format {fmt!r} is not supported; this cq reads {FORMAT!r}")
    entries: dict[str, dict[str, str]] = {}
    for key in shapes:
        split = _split(key, _CQ_SUFFIXES if is_cq else _REF_SUFFIXES)
        w8 = _W8A8_KEY.match(key) if is_cq and split is None else None
        if w8 is not None:
            split = (w8["layer"], w8["suffix"])
        if split is None:
            if is_cq:
                raise InputError(f"{path}: unexpected tensor {key!r} in a {FORMAT} file; expected "
                                 f"<layer>.{{{','.join(_CQ_SUFFIXES)}}}")
            continue
        layer, suffix = split
        entries.setdefault(layer, {})[suffix] = key
    if not entries:
        raise InputError(f"{path}: no calibration entries (<layer>.hessian, or the reference's "
                         "<layer>.channel_max / <layer>.input_scale) found")
    samples = None
    if is_cq:
        raw = meta.get("samples")
        if raw is not None:
            try:
                samples = int(raw)
            except ValueError:
                raise InputError(f"{path}: metadata samples={raw!r} must be an integer token count") from None
            if samples <= 0:
                raise InputError(f"{path}: metadata samples={samples} must be positive")
        for layer, entry in entries.items():
            if "hessian" not in entry:
                raise InputError(f"{path}: layer {layer!r} has {sorted(entry)} but no {layer}.hessian")
            shape = shapes[entry["hessian"]]
            if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
                raise InputError(f"{path}: {layer}.hessian must be square [K, K], got {list(shape)}")
            if "upstream" in entry and shapes[entry["upstream"]] != shape:
                raise InputError(f"{path}: {layer}.upstream must be {list(shape)} like the Hessian, "
                                 f"got {list(shapes[entry['upstream']])}")
            for suffix in ("input_absmax", "input_mean"):
                if suffix in entry and shapes[entry[suffix]] != (shape[0],):
                    raise InputError(f"{path}: {layer}.{suffix} must be [{shape[0]}] to match the Hessian, "
                                     f"got {list(shapes[entry[suffix]])}")
            if "samples" in entry and shapes[entry["samples"]] not in ((), (1,)):
                raise InputError(f"{path}: {layer}.samples must be a scalar, got {list(shapes[entry['samples']])}")
            if samples is None and "samples" not in entry:
                raise InputError(f"{path}: no token count for {layer!r}: set the metadata entry 'samples' "
                                 f"or a {layer}.samples tensor")
    else:
        for layer, entry in entries.items():
            for suffix in ("channel_max", "channel_mean"):
                if suffix in entry and len(shapes[entry[suffix]]) != 1:
                    raise InputError(f"{path}: {layer}.{suffix} must be [K], got {list(shapes[entry[suffix]])}")
    return Calibration(path=path, kind="cq" if is_cq else "reference", samples=samples, entries=entries,
                       metadata=meta)


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Open a calibration file (cq's format or the reference's) for lazy per-layer reads.

    The header is checked at once (layout, shapes, token counts); each tensor is read and
    validated (finite, symmetric Hessian) when it is asked for. Every problem raises
    :class:`~cq.errors.InputError` naming the file and the layer.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"calibration file not found: {p}; write one with cq.calibrate.capture + "
                         "save_calibration, or leave calibration_data_path unset (H = I)")
    if p.is_dir():
        raise InputError(f"calibration path is a directory: {p}; pass the .safetensors or .json file")
    if p.suffix.lower() == ".json":
        return _load_reference_json(p)
    return _load_safetensors(p)


# ---------------------------------------------------------------------------------------------


def layer_data(calibration: Calibration, layer: str, k: int, *, hessian: bool = True):
    """Everything ``calibration`` holds for ``layer`` (in_features ``k``) as a :class:`~cq.transforms.attach.LayerData`.

    ``hessian=False`` skips reading the Hessian (recipes that only use the statistics).
    """
    from ..transforms.attach import LayerData

    h = calibration.hessian(layer, k=k) if hessian else None
    stats = {"input_absmax": calibration.input_absmax(layer), "input_mean": calibration.input_mean(layer),
             "samples": calibration.layer_samples(layer)}
    stats = {key: v for key, v in stats.items() if v is not None}
    w8a8 = calibration.w8a8_stats(layer) if calibration.kind == "cq" else {}
    upstream = calibration.upstream(layer, k=k) if hessian and h is not None and calibration.kind == "cq" else None
    note = None
    if hessian and h is None:
        note = f"calibration: no Hessian for {layer} in {calibration.path.name}; H = I (round-to-nearest quality)"
    elif hessian and calibration.hessian_kind(layer) == "diagonal":  # say what the reference's file gives
        note = (f"calibration: diagonal Hessian from the channel statistics in {calibration.path.name} "
                "(no cross-channel terms)")
    return LayerData(hessian=h, stats=stats, w8a8=w8a8, note=note, upstream=upstream)


def attach_calibration(state: LayerState, calibration: Calibration, *, layer: str | None = None) -> LayerState:
    """Give ``state`` its Hessian (and input statistics) from ``calibration``.

    ``layer`` defaults to ``state.name``. A layer the file lacks keeps ``hessian=None`` with a
    note (GPTQ/LDLQ then use ``H = I``). Input statistics go to ``meta["calibration"]``, ComfyUI
    activation-path statistics to ``meta["w8a8_stats"]``. Attach before any rotation stage: the
    file holds original-basis statistics. (The same :func:`~cq.transforms.attach.attach_data` stage
    the file runner uses.)
    """
    from ..transforms.attach import attach_data

    return attach_data(state, cfg=layer_data(calibration, layer or state.name, state.shape[1]))


def synthetic_hessian(k: int, *, samples: int, seed: int, lora_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The reference tool's synthetic "calibration": ``H = 2/T · XᵀX`` of seeded Gaussian noise.

    **Not data-aware.** Gaussian ``X`` gives ``H ≈ 2·I`` plus noise, so GPTQ/LDLQ with it are
    round-to-nearest at best (and often slightly worse: they fit the noise). It exists for
    compatibility with ``calib_samples`` / ``seed`` / ``calibration_lora_path``. With ``lora_rows``
    (a LoRA's A matrix ``[r, K]``) the rows are stacked first, then ``samples − r`` noise rows
    (just the first ``samples`` LoRA rows if ``r ≥ samples``). Deterministic for a seed: the noise
    comes from a CPU ``torch.Generator``, whatever the device.

    Example:
        >>> h = synthetic_hessian(4, samples=4096, seed=0)
        >>> torch.equal(h, synthetic_hessian(4, samples=4096, seed=0)), round(float(h.diagonal().mean()), 1)
        (True, 2.0)
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
        raise ConfigError(f"samples={samples!r} must be a positive int (the reference's calib_samples, e.g. 6144)")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ConfigError(f"k={k!r} must be a positive int (in_features)")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    parts = []
    if lora_rows is not None:
        a = lora_rows.detach().to(torch.float32).cpu()
        if a.ndim != 2 or a.shape[1] != k:
            raise InputError(f"lora_rows must be a LoRA A matrix [rank, {k}], got {tuple(a.shape)}")
        parts.append(a[:samples])
    rest = samples - sum(p.shape[0] for p in parts)
    if rest > 0:
        parts.append(torch.randn(rest, k, generator=g, dtype=torch.float32))
    acc = hessian_init(k)
    for p in parts:
        acc = hessian_update(acc, p)
    return hessian_finalize(acc).hessian
