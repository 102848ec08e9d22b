"""Whole-file conversion throughput and peak memory: cq vs a naive eager script (and peers), same run.

Every converter runs in its own fresh subprocess (so each reports its own peak RSS), ``--repeat``
times; the table gives the minimum time and the spread (max − min). The input file is written once
and read from the page cache by every run (it is smaller than RAM), so reads cost a memory copy.

Rows:

* naive eager script: ``safetensors.torch.load_file`` → per-row absmax RTN in float32 for every
  2-D ``.weight`` → ``save_file`` (what a user writes by hand; holds the whole model in memory);
* ``cq default``: the runner as the facade and the CLI call it by default (fused per-row RTN from the
  stored dtype, read-ahead within the balanced tier, background writes, the per-layer report);
* ``cq --low-memory``: the same with the smallest memory tier (no read-ahead);
* ``cq streamed``: cq's speed pieces composed the way the runner is meant to call them:
  :func:`cq.io.prefetch.prefetch_file` reads ahead, :func:`cq.transforms.fused.fused_rtn` quantizes
  straight from bf16 and forms the report's weight metrics in the same sweep, a
  :class:`cq.io.prefetch.BackgroundWriter` writes behind (sampled read-back check, one fsync);
* the peer, ``convert_to_quant`` (PyPI, the tool cq re-implements), run by the interpreter of its own
  venv (``--peer-python``; it is never installed next to cq) through its CLI entry point, in its
  fastest mode equivalent to cq's default: ``--comfy_quant --int8 --scaling_mode row --simple``
  (per-row absmax round-to-nearest, ``int8_tensorwise`` + ``per_row``). It always bias-corrects
  layers that have a bias, from ``--calib_samples`` (3072) synthetic rows: one 3072×K×N float32
  matmul per layer that cq's default does not do; ``peer-calib1`` is its fastest setting (one row,
  so the correction is mostly noise). ``vs peer`` is against the faster of the two. ``peer-learned``
  (not run by default: minutes per layer on CPU) is its default learned rounding, same scale layout.

Quick mode (``make bench``) converts 8 × 4096² (256 MiB); the issue's target size is
``--layers 128`` (2147 M parameters, 4 GiB bf16).

Usage: python benchmarks/bench_convert.py [--layers 8] [--dim 4096] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
DEFAULT_PEER_PYTHON = "/work/peer-venv/bin/python"  # where the peer's own venv lives on the dev machines


# ---------------------------------------------------------------------------------------------
# The converters (each runs inside a child process: `bench_convert.py --child NAME SRC DST`).


def naive(src: str, dst: str) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(src)
    out = {}
    for k, t in sd.items():
        if k.endswith(".weight") and t.ndim == 2:
            w = t.float()
            s = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-30)
            out[k] = torch.round(w / s).clamp(-127, 127).to(torch.int8)
            out[k[:-7] + ".weight_scale"] = s
        else:
            out[k] = t
    save_file(out, dst)
    return {}


def cq_convert_file(src: str, dst: str) -> dict:
    from cq.api import convert_to_int8

    rep = convert_to_int8(src, dst, comfy_quant=True, filter_flags={}, calib_samples=1, seed=0)
    sq = [r.metrics.get("sqnr_db") for r in rep.quantized]
    return {"layers": len(sq), "min_sqnr_db": min(sq) if sq else None}


def cq_low_memory(src: str, dst: str) -> dict:
    from cq.api import convert_to_int8

    rep = convert_to_int8(src, dst, comfy_quant=True, filter_flags={}, calib_samples=1, seed=0, low_memory=True)
    sq = [r.metrics.get("sqnr_db") for r in rep.quantized]
    return {"layers": len(sq), "min_sqnr_db": min(sq) if sq else None}


def cq_streamed(src: str, dst: str, profile: dict | None = None) -> dict:
    """cq's pieces composed by hand, without the runner's planning and report (see the module docstring)."""
    from cq.io import SafetensorsWriter, read_header
    from cq.io.comfy import layer_tensors
    from cq.io.prefetch import BackgroundWriter, prefetch_file
    from cq.state import LayerState
    from cq.transforms.fused import fused_rtn

    header = read_header(src)
    sqnr = []
    clock = {"wait for reads": 0.0, "fused_rtn": 0.0, "wait for writes": 0.0, "commit (fsync, check)": 0.0}
    t_start = time.perf_counter()
    with SafetensorsWriter(dst, metadata=dict(header.metadata), forbid=[src]) as w:
        with BackgroundWriter(w) as bw:
            reads = prefetch_file(src, zero_copy=True)
            while True:
                t0 = time.perf_counter()
                item = next(reads, None)
                clock["wait for reads"] += time.perf_counter() - t0
                if item is None:
                    break
                key, t = item
                t0 = time.perf_counter()
                if key.endswith(".weight") and t.ndim == 2 and t.is_floating_point() and t.numel():
                    out = fused_rtn(LayerState.from_weight(key[:-len(".weight")], t))
                    sqnr.append(out.metrics["sqnr_db"])
                    tensors = layer_tensors(out)
                else:
                    tensors = {key: t}
                t1 = time.perf_counter()
                clock["fused_rtn"] += t1 - t0
                for name, x in tensors.items():
                    bw.add(name, x)
                clock["wait for writes"] += time.perf_counter() - t1
            t0 = time.perf_counter()
        clock["wait for writes"] += time.perf_counter() - t0  # the last queued writes
        t0 = time.perf_counter()
    clock["commit (fsync, check)"] += time.perf_counter() - t0
    if profile is not None:
        profile.update(clock, total=time.perf_counter() - t_start)
    return {"layers": len(sqnr), "min_sqnr_db": min(sqnr) if sqnr else None}


# The peer's CLI flags per row (after `-i SRC -o DST --comfy_quant --device cpu --manual_seed 0`).
PEER_FLAGS = {
    "peer": ["--int8", "--scaling_mode", "row", "--simple"],
    "peer-calib1": ["--int8", "--scaling_mode", "row", "--simple", "--calib_samples", "1"],
    "peer-learned": ["--int8", "--scaling_mode", "row"],
}


def _peer(name: str):
    def run(src: str, dst: str) -> dict:
        # Runs inside the peer's own interpreter: only its package is importable, not cq.
        from convert_to_quant.convert_to_quant import main as peer_main

        sys.argv = ["convert_to_quant", "-i", src, "-o", dst, "--comfy_quant", "--device", "cpu",
                    "--manual_seed", "0", *PEER_FLAGS[name]]
        peer_main()
        if not os.path.exists(dst):  # it logs some failures and returns normally
            raise RuntimeError(f"convert_to_quant wrote no {dst}")
        return {}

    return run


CONVERTERS = {
    "naive": ("naive eager script (load_file → RTN → save_file)", naive),
    "cq": ("cq default (convert_to_int8 / CLI defaults: fused RTN, read-ahead, background writes, report on)",
           cq_convert_file),
    "cq-low-memory": ("cq --low-memory (no read-ahead: the smallest memory tier)", cq_low_memory),
    "cq-streamed": ("cq streamed: prefetch → fused_rtn → background write", cq_streamed),
    "peer": ("peer convert_to_quant --int8 --scaling_mode row --simple (per-row RTN, bias correction)",
             _peer("peer")),
    "peer-calib1": ("peer convert_to_quant … --simple --calib_samples 1 (its fastest: 1-row bias correction)",
                    _peer("peer-calib1")),
    "peer-learned": ("peer convert_to_quant --int8 --scaling_mode row (its default learned rounding)",
                     _peer("peer-learned")),
}


def _peak_rss_mib() -> float:
    # VmHWM of this process's own address space. Not ru_maxrss: Linux carries the parent's
    # high-water mark across fork + exec into it, which made every child report the parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - not Linux


def _child(name: str, src: str, dst: str) -> None:
    t0 = time.perf_counter()
    extra = CONVERTERS[name][1](src, dst)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "rss_mib": _peak_rss_mib(), **extra}))


def _run(name: str, src: str, dst: str, threads: int | None, python: str | None = None) -> dict | None:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([python or sys.executable, os.path.abspath(__file__), "--child", name, src, dst],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        if name in PEER_FLAGS:  # a broken peer install is reported, not fatal
            print(f"({name} failed with {python}, skipped:\n{r.stderr[-1500:]})")
            return None
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _profile(src: str, dst: str) -> None:
    """Where the streamed path's wall time goes, measured inside one overlapped run."""
    import torch

    prof: dict = {}
    cq_streamed(src, dst, prof)
    total = prof.pop("total")
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in prof.items())
    print(f"\nprofile of cq streamed ({torch.get_num_threads()} threads), main thread's wall time {total:.2f} s: "
          f"{parts} (reads and writes run in background threads; a wait is time they were behind)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3, help="runs per converter (min and spread are reported)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every converter")
    ap.add_argument("--only", default="naive,cq,cq-low-memory,cq-streamed,peer,peer-calib1",
                    help="comma-separated converters to run (also: peer-learned)")
    ap.add_argument("--profile", action="store_true", help="also print the streamed path's time split")
    ap.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON if os.path.exists(DEFAULT_PEER_PYTHON) else None,
                    help="interpreter of a venv with convert_to_quant installed (default: %(default)s); "
                         "without one the peer rows are skipped")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    import torch

    g = torch.Generator().manual_seed(0)
    params = args.layers * args.dim * args.dim
    with tempfile.TemporaryDirectory(dir=os.environ.get("CQ_BENCH_DIR")) as tmp:
        src = os.path.join(tmp, "model.safetensors")
        from cq.io import SafetensorsWriter

        with SafetensorsWriter(src, verify="header") as w:  # streamed: this process stays small
            for i in range(args.layers):
                w.add(f"blocks.{i}.fc.weight", (torch.randn(args.dim, args.dim, generator=g) * 0.02).to(torch.bfloat16))
                w.add(f"blocks.{i}.fc.bias", torch.zeros(args.dim, dtype=torch.bfloat16))
        size = os.path.getsize(src)
        names = []
        for name in args.only.split(","):
            if name in PEER_FLAGS and not args.peer_python:
                print(f"({name}: no peer interpreter (--peer-python, or {DEFAULT_PEER_PYTHON} when it exists), "
                      "skipped)")
                continue
            names.append(name)
        # Interleaved: round r runs every converter once, so a change of load on the shared machine
        # hits all of them alike instead of one converter's whole series.
        results: dict[str, list] = {name: [] for name in names}
        failed: set[str] = set()  # a peer that failed once is not run again
        for _ in range(args.repeat):
            for name in names:
                if name in failed:
                    continue
                r = _run(name, src, os.path.join(tmp, f"{name}.safetensors"), args.threads,
                         args.peer_python if name in PEER_FLAGS else None)
                if r is None:
                    failed.add(name)
                    continue
                results[name].append(r)
                os.unlink(os.path.join(tmp, f"{name}.safetensors"))
        rows = [(name, CONVERTERS[name][0], results[name]) for name in names if results[name]]
        if args.profile:
            _profile(src, os.path.join(tmp, "profile.safetensors"))
    threads = args.threads or torch.get_num_threads()
    print(f"\n{args.layers} × [{args.dim}, {args.dim}] bf16 Linear weights + biases = {params / 1e6:.0f} M parameters "
          f"({size / 2**30:.2f} GiB), {threads} threads, {os.cpu_count()} CPUs; {args.repeat} runs each, min and "
          f"spread (max − min); the machine is shared, so spreads are wide\n")
    best = {n: min(r["seconds"] for r in runs) for n, _, runs in rows}
    base = best.get("naive")
    peer_best = min((best[n] for n in ("peer", "peer-calib1") if n in best), default=None)  # the fastest RTN peer
    print("| converter | time (min) | spread | Mparam/s | peak RSS | vs naive | vs peer | quality |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label, runs in rows:
        t = best[name]
        spread = max(r["seconds"] for r in runs) - t
        rss = max(r["rss_mib"] for r in runs)
        q = runs[0].get("min_sqnr_db")
        print(f"| {label} | {t:.2f} s | {spread:.2f} s | {params / t / 1e6:.0f} | {rss / 1024:.2f} GiB | "
              f"{f'{base / t:.2f}×' if base else '-'} | {f'{peer_best / t:.2f}×' if peer_best else '-'} | "
              f"{'min SQNR %.1f dB' % q if q is not None else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
