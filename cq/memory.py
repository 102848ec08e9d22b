"""Memory tiers: what ``low_memory`` / ``streaming_mode`` / ``streaming_thresholds`` promise, as numbers.

A tier bounds the **host** memory of a run (tensor bytes the runner holds at once) and, on a GPU,
which layers are too large for the device (the reference's ``streaming_thresholds`` keys). The budget
of a run is a sum of stated terms, computed before anything is converted:

=============  ===========================  ===============  =========================================
tier           input tensors held           read-ahead       GPU → CPU thresholds (reference keys)
=============  ===========================  ===============  =========================================
``off``        the whole file (read ahead)  —                none (every layer on the run's device)
``minimal``    one layer                    ≤ 1 GiB          hadamard 150M, hessian 32768, ldlq 65536
``balanced``   one layer                    ≤ 256 MiB        hadamard 100M, hessian 24576, ldlq 49152
``aggressive`` one layer                    none             hadamard 25M, hessian 8192, ldlq 16384
``auto``       ``off`` when file + layer ≤ ½ of available RAM, else the first of minimal → balanced →
               aggressive whose budget fits in ½ of it (an error when none does)
=============  ===========================  ===============  =========================================

``budget = input held + read-ahead + working set of the largest layer`` (:func:`layer_working_set`:
the weight, its float32 copy, the recipe's temporaries, the Hessian and the metric probes).
``low_memory=True`` is the ``aggressive`` host tier whatever ``streaming_mode`` says (the thresholds
stay the mode's). ``streaming_thresholds`` overrides single keys (``hadamard_elements``,
``hessian_dim``, ``ldlq_dim``, ``ortho_dim``; ``None`` keeps the tier's value): on a CUDA run a
layer over a threshold for a step its recipe runs is computed on the CPU (:func:`layer_device`).

Example:
    >>> p = memory_policy("aggressive", streaming_thresholds={"hessian_dim": 4096})
    >>> p.tier, p.preload, p.read_ahead_bytes, p.thresholds["hessian_dim"], p.thresholds["ldlq_dim"]
    ('aggressive', False, 0, 4096, 16384)
"""

from __future__ import annotations

import logging
import math
import os
import types
import warnings
from typing import Any, Mapping

import attrs
import torch

from .errors import ConfigError

__all__ = ["MemoryPolicy", "MemoryBudget", "memory_policy", "policy_for_config", "layer_working_set",
           "plan_budget", "available_memory", "layer_device", "warn_unused_thresholds", "TIERS", "THRESHOLD_KEYS",
           "STREAMING_MODES"]

log = logging.getLogger("cq.memory")

GiB = 1 << 30
MiB = 1 << 20
INF = math.inf
#: The reference's ``streaming_thresholds`` keys (``config/streaming_config.py``).
THRESHOLD_KEYS = ("hadamard_elements", "hessian_dim", "ldlq_dim", "ortho_dim")
STREAMING_MODES = ("off", "minimal", "balanced", "aggressive", "auto")

#: tier -> (preload the input, read-ahead bytes, thresholds); thresholds are the reference's table.
TIERS: Mapping[str, tuple[bool, int, Mapping[str, float]]] = types.MappingProxyType({
    "off": (True, 0, dict.fromkeys(THRESHOLD_KEYS, INF)),
    "minimal": (False, 1 * GiB, {"hadamard_elements": 150e6, "hessian_dim": 32768, "ldlq_dim": 65536,
                                 "ortho_dim": 16384}),
    "balanced": (False, 256 * MiB, {"hadamard_elements": 100e6, "hessian_dim": 24576, "ldlq_dim": 49152,
                                    "ortho_dim": 12288}),
    "aggressive": (False, 0, {"hadamard_elements": 25e6, "hessian_dim": 8192, "ldlq_dim": 16384,
                              "ortho_dim": 4096}),
})


def _thresholds(value: Mapping[str, Any] | None) -> Mapping[str, float]:
    return types.MappingProxyType(dict(value or {}))


@attrs.frozen(kw_only=True)
class MemoryPolicy:
    """A resolved tier: ``tier`` (never ``auto`` once resolved), what it holds and its thresholds.

    ``mode`` is what was asked (``auto`` stays ``auto`` until :func:`plan_budget` resolves it
    against the file and the machine). ``explicit`` lists the threshold keys the user set.
    """

    mode: str
    tier: str
    preload: bool
    read_ahead_bytes: int
    thresholds: Mapping[str, float] = attrs.field(converter=_thresholds)
    explicit: tuple[str, ...] = ()
    low_memory: bool = False


def memory_policy(streaming_mode: str = "balanced", *, low_memory: bool = False,
                  streaming_thresholds: Mapping[str, int | float | None] | None = None) -> MemoryPolicy:
    """The policy the reference's three options ask for (validated; ``auto`` resolved later).

    Raises:
        ConfigError: an unknown mode, an unknown threshold key (the reference's keys are
            ``hadamard_elements``, ``hessian_dim``, ``ldlq_dim``, ``ortho_dim``) or a value that is
            not a positive number.

    Example:
        >>> memory_policy("off").preload, memory_policy("off", low_memory=True).preload
        (True, False)
        >>> memory_policy("balanced", streaming_thresholds={"hessian": 1})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cq.errors.ConfigError: streaming_thresholds key 'hessian' is not one of ...
    """
    if streaming_mode not in STREAMING_MODES:
        raise ConfigError(f"streaming_mode={streaming_mode!r} is not one of {list(STREAMING_MODES)}")
    if streaming_thresholds is not None and not isinstance(streaming_thresholds, Mapping):
        raise ConfigError(f"streaming_thresholds must be a dict {{key: int}} with keys {list(THRESHOLD_KEYS)}, "
                          f"got {type(streaming_thresholds).__name__}")
    overrides: dict[str, float] = {}
    for key, value in dict(streaming_thresholds or {}).items():
        if key not in THRESHOLD_KEYS:
            raise ConfigError(f"streaming_thresholds key {key!r} is not one of {list(THRESHOLD_KEYS)} (the "
                              "reference's keys); fix the spelling")
        if value is None:
            continue  # the reference's "use the tier's value"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"streaming_thresholds[{key!r}]={value!r} must be a positive number (elements or "
                              "a dimension), or None for the tier's value")
        overrides[key] = value
    tier = "balanced" if streaming_mode == "auto" else streaming_mode  # placeholder until plan_budget
    preload, read_ahead, base = TIERS[tier]
    if low_memory:
        preload, read_ahead = TIERS["aggressive"][:2]
    return MemoryPolicy(mode=streaming_mode, tier=tier, preload=preload, read_ahead_bytes=read_ahead,
                        thresholds={**base, **overrides}, explicit=tuple(overrides), low_memory=bool(low_memory))


def policy_for_config(cfg: Any) -> MemoryPolicy:
    """The policy of a :class:`~cq.config.ConvertConfig`: its ``memory`` field when it has one, else
    ``low_memory`` read as the reference does (``True``: streaming, the ``balanced`` tier; ``False``: ``off``).

    Example:
        >>> from cq.config import ConvertConfig
        >>> policy_for_config(ConvertConfig(low_memory=True)).tier
        'balanced'
    """
    policy = getattr(cfg, "memory", None)
    if isinstance(policy, MemoryPolicy):
        return policy
    return memory_policy("balanced" if getattr(cfg, "low_memory", False) else "off")


def _uses(plan: Any) -> tuple[bool, bool]:
    """(uses a Hessian, rotates the weight) for a plan's recipe; a Pipeline is assumed to do both."""
    from .pipeline import Pipeline
    from .recipes import recipe_info

    recipe = getattr(plan, "recipe", None)
    if recipe is None:
        return False, False
    if isinstance(recipe, Pipeline):
        return True, True
    hessian = bool(recipe_info(recipe).uses_hessian)
    return hessian, type(recipe).__name__ == "QuIP"


def layer_working_set(plan: Any, shape: tuple[int, ...], itemsize: int, *, metrics_tokens: int = 64) -> int:
    """Bytes one layer's conversion holds at its peak (an upper bound, measured: see benchmarks/bench_memory.py).

    For an ``[N, K]`` weight stored with ``itemsize`` bytes: the input and the recipe's copies of it
    (6 float32 copies for round-to-nearest, 14 float64 copies with a Hessian, of the padded
    ``[N', K']`` for rotating recipes), the Hessian and its factorisations (``6·8K'²``), the metric
    probes (``metrics_tokens·(N+K)`` floats, three times) and 8 MiB of allocator slack.

    Example:
        >>> from cq.convert import LayerPlan
        >>> from cq.recipes import RTN, GPTQ
        >>> p = LayerPlan(key="a.weight", action="quantize", recipe=RTN())
        >>> layer_working_set(p, (1024, 1024), 2) < layer_working_set(p.with_recipe(GPTQ()), (1024, 1024), 2)
        True
    """
    if len(shape) != 2:
        return math.prod(shape) * itemsize * 2 + 8 * MiB
    n, k = shape
    hessian, rotates = _uses(plan)
    pad = (lambda x: 1 << max(x - 1, 0).bit_length()) if rotates else (lambda x: x)
    np_, kp = pad(n), pad(k)
    work = n * k * itemsize + np_ * kp * (112 if hessian else 24)
    if hessian:
        work += 6 * 8 * kp * kp
    work += 3 * 4 * metrics_tokens * (n + k)
    return int(work + 8 * MiB)


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int:
    """Bytes this process can still allocate: the least of the kernel's ``MemAvailable``, the
    address-space limit (``RLIMIT_AS``) minus what is mapped, and the cgroup's ``memory.max`` minus
    its usage (containers, job schedulers).

    Example:
        >>> available_memory() > 0
        True
    """
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft - (_status_bytes("VmSize") or 0))
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        pass
    cg_max, cg_now = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if cg_max is not None and cg_now is not None:
        limits.append(cg_max - cg_now)
    if not limits:
        try:
            limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):  # pragma: no cover - no sysconf
            limits.append(1 << 62)
    return max(0, min(limits))


@attrs.frozen(kw_only=True)
class MemoryBudget:
    """The host bytes a run may hold: ``input_bytes + read_ahead_bytes + layer_bytes`` (``total``)."""

    policy: MemoryPolicy
    input_bytes: int  # the preloaded file (tier off), else 0
    read_ahead_bytes: int
    layer_bytes: int  # working set of the largest layer
    largest_layer: str | None

    @property
    def total(self) -> int:
        return self.input_bytes + self.read_ahead_bytes + self.layer_bytes

    def describe(self) -> str:
        mib = lambda b: f"{b / MiB:.0f} MiB"  # noqa: E731
        return (f"streaming_mode={self.policy.mode!r} → tier {self.policy.tier}: budget {mib(self.total)} "
                f"(input held {mib(self.input_bytes)}, read-ahead {mib(self.read_ahead_bytes)}, largest layer "
                f"{self.largest_layer} {mib(self.layer_bytes)})")


def plan_budget(plans, header, policy: MemoryPolicy, *, metrics_tokens: int = 64,
                available: int | None = None) -> MemoryBudget:
    """The budget of converting ``plans`` (from :func:`cq.convert.plan_model`) of the file ``header``.

    ``auto`` is resolved here against ``available`` (default :func:`available_memory`). A fixed
    tier's read-ahead shrinks to what is available; when its input and largest layer alone exceed
    ``available`` it is an error naming a tier that fits (nothing is converted). ``header`` is a
    :class:`cq.io.loader.SafetensorsHeader`.

    Example:
        >>> import tempfile, os, torch
        >>> from cq.io import write_safetensors, read_header
        >>> from cq.convert import plan_model
        >>> from cq.config import ConvertConfig
        >>> from cq.model import DictView
        >>> t = {"a.weight": torch.randn(64, 64)}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_safetensors(os.path.join(d, "m.safetensors"), t)
        ...     h = read_header(os.path.join(d, "m.safetensors"))
        >>> b = plan_budget(plan_model(DictView(t), ConvertConfig()), h, memory_policy("aggressive"))
        >>> b.input_bytes, b.read_ahead_bytes, b.largest_layer
        (0, 0, 'a.weight')
    """
    layer_bytes, largest = 0, None
    for p in plans:
        if p.action == "remove":
            continue
        info = header.tensors[p.key]
        if p.action == "quantize":
            need = layer_working_set(p, info.shape, info.dtype.itemsize, metrics_tokens=metrics_tokens)
        else:
            need = 2 * info.nbytes  # read, and the edited copy of a kept tensor
        if need > layer_bytes:
            layer_bytes, largest = need, p.key
    file_bytes = sum(i.nbytes for i in header.tensors.values())
    avail = available_memory() if available is None else available

    def budget(pol: MemoryPolicy) -> MemoryBudget:
        return MemoryBudget(policy=pol, input_bytes=file_bytes if pol.preload else 0,
                            read_ahead_bytes=pol.read_ahead_bytes, layer_bytes=layer_bytes, largest_layer=largest)

    if policy.mode == "auto":
        for tier in ("aggressive",) if policy.low_memory else ("off", "minimal", "balanced", "aggressive"):
            preload, read_ahead, _ = TIERS[tier]
            candidate = budget(attrs.evolve(policy, tier=tier, preload=preload, read_ahead_bytes=read_ahead))
            if candidate.total <= avail // 2:
                log.info("streaming_mode='auto': %s", candidate.describe())
                return candidate
        policy = attrs.evolve(policy, tier="aggressive", preload=False, read_ahead_bytes=0)
    out = budget(policy)
    if out.total > avail >= out.input_bytes + out.layer_bytes:
        # Read-ahead only overlaps I/O: it shrinks to what is free instead of failing the run.
        out = attrs.evolve(out, read_ahead_bytes=avail - out.input_bytes - out.layer_bytes)
        log.info("read-ahead limited to %d MiB by the available memory", out.read_ahead_bytes // MiB)
    if out.total > avail:
        hint = ("use streaming_mode='balanced' (or 'auto'): the streaming tiers hold one layer at a time"
                if layer_bytes <= avail else
                f"no tier fits: layer {largest} alone needs {layer_bytes / MiB:.0f} MiB; free memory or run it "
                "on a machine with more")
        raise ConfigError(f"{out.describe()}, but only {avail / MiB:.0f} MiB are available; {hint}")
    return out


def layer_device(plan: Any, shape: tuple[int, ...], device: torch.device, policy: MemoryPolicy) -> torch.device:
    """Where a layer is computed: ``device``, or the CPU when it is CUDA and the layer passes a threshold.

    ``hessian_dim`` and ``ldlq_dim`` compare with K for recipes that use a Hessian (GPTQ, LDLQ,
    QuIP), ``hadamard_elements`` with the padded N·K of rotating recipes (QuIP); ``ortho_dim`` has no
    step in cq (its Hadamard path replaces the random orthogonal one) and is accepted for
    compatibility.

    Example:
        >>> from cq.convert import LayerPlan
        >>> from cq.recipes import GPTQ
        >>> p = LayerPlan(key="a.weight", action="quantize", recipe=GPTQ())
        >>> layer_device(p, (64, 9000), torch.device("cuda"), memory_policy("aggressive")).type
        'cpu'
    """
    if device.type != "cuda" or len(shape) != 2:
        return device
    n, k = shape
    hessian, rotates = _uses(plan)
    t = policy.thresholds
    pad = lambda x: 1 << max(x - 1, 0).bit_length()  # noqa: E731
    over = (hessian and (k > t["hessian_dim"] or k > t["ldlq_dim"])) or (
        rotates and pad(n) * pad(k) > t["hadamard_elements"])
    return torch.device("cpu") if over else device


def warn_unused_thresholds(policy: MemoryPolicy, device: torch.device) -> None:
    """Warn when ``streaming_thresholds`` were set but the run computes on the CPU (nothing to offload).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     warn_unused_thresholds(memory_policy(streaming_thresholds={"ldlq_dim": 8}), torch.device("cpu"))
        >>> "no effect" in str(w[0].message)
        True
    """
    if policy.explicit and device.type != "cuda":
        warnings.warn(f"streaming_thresholds {sorted(policy.explicit)} have no effect: they move layers from a GPU "
                      f"to the CPU, and this run computes on {device}; drop them or use --device cuda",
                      UserWarning, stacklevel=3)
