"""Layer-parallel conversion across processes (``torchrun``), resumable, byte-identical to one process.

``torchrun --nproc-per-node N -m cq -i in.safetensors -o out.safetensors …`` (and multi-node
``torchrun --nnodes …``) runs :func:`convert_file_distributed` on every rank:

1. Every rank plans the file (:func:`cq.convert.plan_model`), runs the model transforms and opens
   the Hessian source, exactly as :func:`cq.convert.convert_file` does.
2. Rank 0 checks the work folder next to the output (``.<output name>.cq-work/``): layers whose
   shard is complete for the same run (checksum and fingerprint of input, config and plans) are
   skipped; the set is broadcast.
3. The remaining quantized layers are spread over the ranks by estimated cost (:func:`layer_cost`:
   ``K³ + N·K²`` for Hessian recipes, ``N·K`` otherwise) with greedy bin packing
   (:func:`assign_layers`, largest first onto the least-loaded rank; the same on every rank, no
   messages). Each rank reads its layers by offset, runs :func:`cq.convert.convert_layer` and writes
   one shard per layer through the atomic writer, then appends a line to its manifest
   (``done.rank<R>.jsonl``: key, shard, size, CRC-32, fingerprint).
4. After a gather of every rank's status (a failure anywhere stops every rank with the rank and
   the layer named), rank 0 streams kept tensors and shards, in file order, into the output with
   the same writer and metadata as a single process: the bytes are identical. The work folder is
   removed after a verified write; an interrupted run keeps it and the next run resumes.

Without ``torch.distributed`` (``WORLD_SIZE`` unset or 1) the same function runs every layer in
this process: a resumable single-process conversion.

Example:
    >>> assign_layers([9.0, 1.0, 5.0, 4.0], 2)  # 9 + 1 on rank 0, 5 + 4 on rank 1
    (0, 0, 1, 1)
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import attrs
import torch

from .config import ConvertConfig, resolve_device
from .errors import ConfigError, CqError, InputError
from .memory import (MemoryPolicy, available_memory, layer_device, plan_budget, policy_for_config,
                     warn_unused_thresholds)

__all__ = ["convert_file_distributed", "layer_cost", "assign_layers", "run_fingerprint", "work_dir_for",
           "world_size", "WORK_SUFFIX"]

log = logging.getLogger("cq.distributed")

WORK_SUFFIX = ".cq-work"
FORMAT = 1  # bump when the shard or manifest layout changes: older work folders are then discarded
#: How long a rank waits for the others (the slowest rank's share of the layers); torchrun stops
#: every rank as soon as one dies, so this only matters for a hung machine.
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("CQ_DIST_TIMEOUT_S", 24 * 3600)))


# ---------------------------------------------------------------------------------------------
# Cost model and assignment.


def layer_cost(plan: Any, shape: Sequence[int]) -> float:
    """Estimated compute of one quantized layer ``[N, K]``: ``K³ + N·K²`` with a Hessian, else ``N·K``.

    The cubic term is the factorisation of the ``K×K`` Hessian, the second the column sweep (GPTQ,
    LDLQ); round-to-nearest and fp16 touch each weight a few times.

    Example:
        >>> from cq.convert import LayerPlan
        >>> from cq.recipes import GPTQ, RTN
        >>> p = LayerPlan(key="a.weight", action="quantize", recipe=RTN())
        >>> layer_cost(p, (8, 4)), layer_cost(p.with_recipe(GPTQ()), (8, 4))
        (32.0, 192.0)
    """
    from .memory import _uses

    if len(shape) != 2:
        return float(max(1, int(torch.tensor(shape).prod()) if shape else 1))
    n, k = shape
    hessian, _ = _uses(plan)
    return float(k ** 3 + n * k * k) if hessian else float(n * k)


def assign_layers(costs: Sequence[float], world: int) -> tuple[int, ...]:
    """The rank of each item: largest cost first onto the least-loaded rank (ties: file order, lowest rank).

    Greedy longest-processing-time packing: the busiest rank finishes within 4/3 of the best possible
    makespan. A pure function of ``costs`` and ``world``, so every rank computes the same answer.

    Example:
        >>> assign_layers([1.0, 1.0, 1.0], 2), assign_layers([], 3)
        ((0, 1, 0), ())
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise CqError(f"world size must be a positive int, got {world!r}")
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return tuple(owner)


# ---------------------------------------------------------------------------------------------
# Process group.


def world_size() -> int:
    """Processes in this run: the initialized group's size, else ``WORLD_SIZE`` (torchrun sets it), else 1.

    Example:
        >>> world_size() >= 1
        True
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise CqError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun") from None


class _Group:
    """The collectives this module needs, over torch.distributed (gloo) or trivially for one process."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.owned = False
        if world_size() > 1 and not dist.is_initialized():
            if not dist.is_available():
                raise CqError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            # gloo carries only small Python objects here (statuses, key sets): it works for CPU and
            # GPU runs alike, so no NCCL setup is needed.
            dist.init_process_group("gloo", timeout=TIMEOUT)
            self.owned = True
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.size = dist.get_world_size() if self.active else 1

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Fingerprint and work folder.


def _describe(value: Any) -> Any:
    """A JSON-able description of a config value; memory addresses removed, files identified by size/mtime."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if os.path.isfile(value):
            st = os.stat(value)
            return [value, st.st_size, st.st_mtime_ns]
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def run_fingerprint(input_file: str, cfg: ConvertConfig, plans: Sequence[Any], edits: Any) -> str:
    """A digest of everything a shard's bytes depend on: input file, config, plans, model-edit stages.

    Two runs with the same fingerprint write the same shards, so a rerun may reuse them. The world
    size is not part of it: a run resumes with any number of processes.

    Example:
        >>> import tempfile, os, torch
        >>> from cq.io import write_safetensors
        >>> from cq.model import DictView, ModelEdits
        >>> from cq.convert import plan_model
        >>> from cq.recipes import GPTQ
        >>> t = {"a.weight": torch.randn(4, 4)}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "m.safetensors"); write_safetensors(p, t)
        ...     a = run_fingerprint(p, ConvertConfig(), plan_model(DictView(t), ConvertConfig()), ModelEdits())
        ...     b = run_fingerprint(p, ConvertConfig(recipe=GPTQ()), plan_model(DictView(t), ConvertConfig(recipe=GPTQ())),
        ...                         ModelEdits())
        >>> a == b, len(a)
        (False, 64)
    """
    from . import __version__
    from .io import read_header

    header = read_header(input_file)
    st = os.stat(input_file)
    with open(input_file, "rb") as f:
        head = f.read(header.data_start)
    doc = {
        "format": FORMAT, "cq": __version__, "torch": torch.__version__,
        "input": {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header": hashlib.sha256(head).hexdigest()},
        "config": {a.name: _describe(getattr(cfg, a.name)) for a in attrs.fields(type(cfg))},
        "plans": [[p.key, p.action, _describe(p.recipe), p.bias_key, p.full_precision_matrix_mult] for p in plans],
        "edits": {k: [s.name for s in v] for k, v in sorted(edits.stages.items())},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def work_dir_for(output_file: str | os.PathLike) -> Path:
    """The work folder of a distributed/resumable run: ``.<output name>.cq-work`` next to the output.

    Example:
        >>> str(work_dir_for("/models/out.safetensors"))
        '/models/.out.safetensors.cq-work'
    """
    out = Path(os.path.abspath(os.fspath(output_file)))
    return out.with_name(f".{out.name}{WORK_SUFFIX}")


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # small: the check must fit the tightest memory tier
            crc = zlib.crc32(chunk, crc)
    return crc


def _shard_name(index: int) -> str:
    return f"{index:06d}.safetensors"


def _verified_done(work: Path, fingerprint: str, keys: set[str]) -> dict[str, dict]:
    """Manifest records whose shard exists with the recorded size and CRC-32, for this run's keys."""
    done: dict[str, dict] = {}
    for manifest in sorted(work.glob("done.rank*.jsonl")):
        for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # the last line of a run killed mid-append
                continue
            if not isinstance(rec, dict) or rec.get("fingerprint") != fingerprint or rec.get("key") not in keys:
                continue
            shard = work / str(rec.get("shard"))
            try:
                ok = shard.stat().st_size == rec.get("bytes") and _file_crc(shard) == rec.get("crc32")
            except OSError:
                ok = False
            if ok:
                done[rec["key"]] = rec
            else:
                log.warning("warning: %s: its shard %s is missing or damaged; converting the layer again",
                            rec["key"], shard.name)
    return done


def _records(work: Path, fingerprint: str) -> list[dict]:
    """Every readable manifest record of this run (the ranks verified their shards when writing them)."""
    out = []
    for manifest in sorted(work.glob("done.rank*.jsonl")):
        for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("fingerprint") == fingerprint:
                out.append(rec)
    return out


def _prepare_work(work: Path, fingerprint: str, input_file: str, output_file: str) -> None:
    """Rank 0: keep the folder for the same run, start it over for another (config or input changed)."""
    manifest = work / "manifest.json"
    if work.exists():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") != fingerprint:
            log.warning("warning: %s holds the work of another run (input, config or cq changed); starting over",
                        work)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not manifest.exists():
        from .io import write_text_atomic

        write_text_atomic(manifest, json.dumps({"format": FORMAT, "fingerprint": fingerprint, "input": input_file,
                                                "output": output_file}, indent=1) + "\n")


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _report_from(meta: dict):
    from .report import LayerReport

    d = json.loads(meta["cq.report"])
    for name in ("shape", "scale_shape", "notes"):
        if isinstance(d.get(name), list):
            d[name] = tuple(d[name])
    return LayerReport(**d)


def _plan_id(p: Any) -> str:
    return json.dumps([p.key, p.action, _describe(p.recipe), p.bias_key, p.full_precision_matrix_mult])


# ---------------------------------------------------------------------------------------------
# The run.


def _rank_device(cfg: ConvertConfig, group: _Group) -> torch.device:
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None and group.size > 1:
        local = int(os.environ.get("LOCAL_RANK", group.rank))
        device = torch.device("cuda", local % torch.cuda.device_count())
    return device


def _prepare(loader, cfg: ConvertConfig, plan, model_transforms):
    """What :func:`cq.convert.convert_file` computes before its loop: view, config, plans, edits."""
    from .convert import model_transforms_for, open_model, plan_model, resolve_selection
    from .model import run_model_transforms

    view, _, _ = open_model(loader, cfg)
    cfg, _, _ = resolve_selection(view, cfg)
    plans = plan_model(view, cfg, plan=plan)
    edits = run_model_transforms(view, model_transforms_for(cfg) + tuple(model_transforms))
    return view, cfg, plans, edits


def _convert_mine(todo, owner, rank, view, cfg, edits, hessians, device, policy, work, fingerprint, progress,
                  loader) -> tuple[str, str] | None:
    """Convert this rank's layers into shards; ``(layer, error)`` on failure, else None."""
    from . import convert as runner
    from .io import NonNativeFormatWarning, SafetensorsWriter

    mine = [(i, p) for (i, p), r in zip(todo, owner) if r == rank]
    total = sum(loader.header.tensors[p.key].nbytes for _, p in mine)
    done = 0
    manifest = work / f"done.rank{rank}.jsonl"
    for i, p in mine:
        if progress is not None:
            progress(p.key, p.recipe_name(), done, total)
        try:
            t0 = time.perf_counter()
            dev = layer_device(p, loader.header.tensors[p.key].shape, device, policy)
            tensors, report, entry = runner.convert_layer(p, view, cfg, edits, hessians, dev)
            report = attrs.evolve(report, seconds=time.perf_counter() - t0)
            meta = {"cq.key": p.key, "cq.plan": _plan_id(p), "cq.fingerprint": fingerprint,
                    "cq.entry": json.dumps(entry), "cq.report": json.dumps(attrs.asdict(report))}
            shard = work / _shard_name(i)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NonNativeFormatWarning)  # said once by rank 0's write
                with SafetensorsWriter(shard, metadata=meta) as w:
                    for name, t in tensors.items():
                        w.add(name, t)
            _append(manifest, {"key": p.key, "shard": shard.name, "bytes": shard.stat().st_size,
                               "crc32": _file_crc(shard), "fingerprint": fingerprint, "rank": rank})
        except Exception as e:  # reported to every rank; KeyboardInterrupt and signals stop the process
            log.debug("rank %d failed on %s", rank, p.key, exc_info=True)
            return p.key, f"{type(e).__name__}: {' '.join(str(e).split())}"
        finally:
            loader.mark_processed(p.key)
        done += loader.header.tensors[p.key].nbytes
    return None


def _shard_reader(work: Path, shards: dict[str, str]):
    """A ``layer_source`` for :func:`cq.convert.convert_file`: each quantized layer read from its shard."""
    from .io import UnifiedSafetensorsLoader

    def from_shard(plan, view, cfg, edits, hessians, device):
        shard = work / shards.get(plan.key, "")
        if plan.key not in shards or not shard.is_file():
            raise CqError(f"{plan.key}: its shard is not in {work} (with several machines the work folder, next "
                          "to the output, must be on a filesystem every node shares); run the command again to resume")
        with UnifiedSafetensorsLoader(shard, low_memory=True) as s:
            meta = s.metadata()
            if meta.get("cq.plan") != _plan_id(plan):
                raise CqError(f"{shard}: converted with the plan {meta.get('cq.plan')}, but the runner now plans "
                              f"{_plan_id(plan)}; cq.distributed and cq.convert disagree (a bug: please report it)")
            tensors = {name: s.get_tensor(name) for name in s.keys()}
        return tensors, _report_from(meta), json.loads(meta["cq.entry"])

    return from_shard


def convert_file_distributed(input_file: str, output_file: str, cfg: ConvertConfig = ConvertConfig(), *,
                             plan: Callable | None = None, model_transforms: Iterable[Callable] = (),
                             progress: Callable | None = None, memory: MemoryPolicy | None = None,
                             keep_work: bool = False):
    """:func:`cq.convert.convert_file` over every process of the run, resumable; rank 0 returns the report.

    Other ranks return ``None`` (rank 0 prints and writes). ``memory`` is the host-memory tier
    (:mod:`cq.memory`; default from ``cfg``): its budget is checked before any layer runs and its
    thresholds send over-sized layers of a CUDA run to the CPU. ``keep_work`` keeps the shards
    after a successful write (the default removes them). An interrupted run (Ctrl-C, a crash, a
    killed rank) keeps its completed shards in :func:`work_dir_for` ``(output_file)``; rerunning the
    same command resumes from them, with any number of processes. Rank 0 writes the output with
    :func:`cq.convert.convert_file` itself (``layer_source``: each layer read from its shard), so the file,
    the report and the notes are the single-process ones (a layer's ``seconds`` is its compute time
    on its rank only in the shard's metadata; the report counts the read).

    Raises:
        CqError: a rank failed (its rank, layer and error are named, on every rank). No output file
            exists after a failure.

    Example:
        >>> import tempfile, os, torch
        >>> from cq.io import write_safetensors
        >>> from cq.convert import convert_file
        >>> with tempfile.TemporaryDirectory() as d:
        ...     src = os.path.join(d, "m.safetensors")
        ...     write_safetensors(src, {"a.weight": torch.randn(32, 16), "b.weight": torch.randn(8, 16)})
        ...     r = convert_file_distributed(src, os.path.join(d, "dist.safetensors"), ConvertConfig(device="cpu"))
        ...     _ = convert_file(src, os.path.join(d, "one.safetensors"), ConvertConfig(device="cpu"))
        ...     same = Path(d, "dist.safetensors").read_bytes() == Path(d, "one.safetensors").read_bytes()
        ...     left = os.listdir(d)
        >>> [l.name for l in r.layers], same, sorted(left)
        (['a', 'b'], True, ['dist.safetensors', 'm.safetensors', 'one.safetensors'])
    """
    from .convert import HessianSource, convert_file
    from .io import UnifiedSafetensorsLoader
    from .io.writer import same_path

    input_file, output_file = os.fspath(input_file), os.fspath(output_file)
    if same_path(input_file, output_file):
        raise InputError(f"{output_file}: the output path is the input file; choose a different output path (-o)")
    policy = memory if memory is not None else policy_for_config(cfg)
    model_transforms = tuple(model_transforms)
    group = _Group()
    try:
        device = _rank_device(cfg, group)
        if group.rank == 0:
            warn_unused_thresholds(policy, device)
        work = work_dir_for(output_file)
        with UnifiedSafetensorsLoader(input_file, low_memory=True) as header_only:
            # Planned from the header (and small stored scales): the budget is checked before the
            # tier's loader reads the weights. Rank 0 decides for every rank, so that all of them
            # run one tier or all stop with the same error; the processes of one machine share its
            # memory, so each gets its share.
            header = header_only.header
            decision: tuple[Any, str | None] = (None, None)
            if group.rank == 0:
                _, _, plans, _ = _prepare(header_only, cfg, plan, model_transforms)
                local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
                try:
                    budget = plan_budget(plans, header, policy, metrics_tokens=cfg.metrics_tokens,
                                         available=available_memory() // local)
                    log.debug("%s", budget.describe())
                    p = budget.policy  # sent as plain values (the policy holds a read-only mapping)
                    decision = ((p.tier, p.preload, p.read_ahead_bytes), None)
                except ConfigError as e:
                    decision = (None, str(e) + (f" (per process: {local} processes share this machine)"
                                                if local > 1 else ""))
            resolved, refusal = group.broadcast(decision)
            if refusal is not None:
                raise ConfigError(refusal)
            tier, preload, read_ahead = resolved
            policy = attrs.evolve(policy, tier=tier, preload=preload, read_ahead_bytes=read_ahead)
        with UnifiedSafetensorsLoader(input_file, low_memory=not policy.preload) as loader:
            view, run_cfg, plans, edits = _prepare(loader, cfg, plan, model_transforms)
            hessians = HessianSource(run_cfg, view)
            fingerprint = run_fingerprint(input_file, run_cfg, plans, edits)
            quant = [(i, p) for i, p in enumerate(plans) if p.action == "quantize"]
            done: set[str] | None = None
            if group.rank == 0:
                _prepare_work(work, fingerprint, input_file, output_file)
                done = set(_verified_done(work, fingerprint, {p.key for _, p in quant}))
                if done:
                    log.info("resuming: %d of %d layers are already converted in %s", len(done), len(quant), work)
            done = group.broadcast(done)
            todo = [(i, p) for i, p in quant if p.key not in done]
            owner = assign_layers([layer_cost(p, header.tensors[p.key].shape) for _, p in todo], group.size)
            failure = _convert_mine(todo, owner, group.rank, view, run_cfg, edits, hessians, device, policy, work,
                                    fingerprint, progress if group.rank == 0 else None, loader)
        failures = [(r, f) for r, f in enumerate(group.gather(failure)) if f is not None]
        if failures:
            r, (key, msg) = failures[0]
            raise CqError(f"rank {r} of {group.size} failed on {key}: {msg}. Finished layers are kept in {work}; "
                          "run the same command again to resume")
        status, report = None, None
        if group.rank == 0:
            try:
                shards = {rec["key"]: rec["shard"] for rec in _records(work, fingerprint)}
                report = convert_file(input_file, output_file, attrs.evolve(cfg, memory=policy), plan=plan,
                                      model_transforms=model_transforms, progress=progress,
                                      layer_source=_shard_reader(work, shards))
                if not keep_work:
                    shutil.rmtree(work, ignore_errors=True)
            except BaseException as e:
                group.broadcast(f"{type(e).__name__}: {' '.join(str(e).split())}")
                raise
        status = group.broadcast(status)
        if status is not None:
            raise CqError(f"rank 0 could not write {output_file}: {status}")
        return report
    finally:
        group.close()
