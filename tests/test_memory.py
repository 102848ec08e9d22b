"""Memory tiers: the budget table, threshold keys, device routing, and a run inside a memory limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cq.config import ConvertConfig
from cq.convert import LayerPlan, plan_model
from cq.errors import ConfigError
from cq.io import read_header, write_safetensors
from cq.memory import (MiB, THRESHOLD_KEYS, TIERS, available_memory, layer_device, layer_working_set, memory_policy,
                       plan_budget, policy_for_config)
from cq.model import DictView
from cq.recipes import GPTQ, RTN, QuIP
from cq.transforms.quip import quip_config_from_legacy


def test_tiers_carry_the_reference_thresholds_and_shrink_in_order():
    assert TIERS["balanced"][2] == {"hadamard_elements": 100e6, "hessian_dim": 24576, "ldlq_dim": 49152,
                                    "ortho_dim": 12288}
    order = ["off", "minimal", "balanced", "aggressive"]
    for key in THRESHOLD_KEYS:
        values = [TIERS[t][2][key] for t in order]
        assert values == sorted(values, reverse=True)
    assert [TIERS[t][1] for t in order[1:]] == sorted((TIERS[t][1] for t in order[1:]), reverse=True)


def test_policy_options():
    p = memory_policy("minimal", streaming_thresholds={"ldlq_dim": 100, "hessian_dim": None})
    assert p.thresholds["ldlq_dim"] == 100 and p.thresholds["hessian_dim"] == 32768 and p.explicit == ("ldlq_dim",)
    assert memory_policy("off", low_memory=True).read_ahead_bytes == 0
    assert policy_for_config(ConvertConfig()).tier == "off"
    with pytest.raises(ConfigError, match="streaming_mode='fast'"):
        memory_policy("fast")
    with pytest.raises(ConfigError, match=r"hadamard_elements.*must be a positive number"):
        memory_policy(streaming_thresholds={"hadamard_elements": -1})
    with pytest.raises(ConfigError, match="must be a dict"):
        memory_policy(streaming_thresholds=[("ldlq_dim", 1)])


def test_thresholds_send_large_layers_of_a_cuda_run_to_the_cpu_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    p = LayerPlan(key="a.weight", action="quantize", recipe=GPTQ())
    tight = memory_policy("balanced", streaming_thresholds={"hessian_dim": 1000})
    assert layer_device(p, (64, 1001), cuda, tight) == cpu
    assert layer_device(p, (64, 1000), cuda, tight) == cuda
    assert layer_device(p.with_recipe(RTN()), (64, 10 ** 6), cuda, tight) == cuda  # no Hessian step
    assert layer_device(p, (64, 10 ** 6), cpu, tight) == cpu
    quip = p.with_recipe(QuIP(quip_config_from_legacy()))
    small_h = memory_policy("balanced", streaming_thresholds={"hadamard_elements": 4096})
    assert layer_device(quip, (64, 65), cuda, small_h) == cpu  # padded 64 x 128 > 4096
    assert layer_device(quip, (64, 64), cuda, small_h) == cuda


def _header(tmp_path, tensors):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, tensors)
    return read_header(path)


def test_budget_sums_the_stated_terms_and_auto_picks_what_fits(tmp_path):
    t = {f"l{i}.weight": torch.randn(256, 256) for i in range(4)}
    h = _header(tmp_path, t)
    plans = plan_model(DictView(t), ConvertConfig())
    layer = layer_working_set(plans[0], (256, 256), 4)
    b = plan_budget(plans, h, memory_policy("balanced"), available=1 << 40)
    assert (b.input_bytes, b.read_ahead_bytes, b.layer_bytes) == (0, 256 * MiB, layer)
    assert plan_budget(plans, h, memory_policy("off"), available=1 << 40).input_bytes == 4 * 256 * 256 * 4
    assert plan_budget(plans, h, memory_policy("auto"), available=1 << 40).policy.tier == "off"
    assert plan_budget(plans, h, memory_policy("auto"), available=2 * layer + MiB).policy.tier == "aggressive"
    assert plan_budget(plans, h, memory_policy("balanced"), available=layer + MiB).read_ahead_bytes == MiB
    with pytest.raises(ConfigError, match="use streaming_mode='balanced'"):
        plan_budget(plans, h, memory_policy("off"), available=layer + MiB // 2)
    with pytest.raises(ConfigError, match="no tier fits: layer l0.weight alone needs"):
        plan_budget(plans, h, memory_policy("aggressive"), available=layer // 2)


def test_hessian_recipes_need_more_than_rounding():
    p = LayerPlan(key="a.weight", action="quantize", recipe=RTN())
    rtn = layer_working_set(p, (512, 512), 2)
    assert layer_working_set(p.with_recipe(GPTQ()), (512, 512), 2) > rtn
    assert layer_working_set(p, (512, 1024), 2) > rtn
    assert available_memory() > 0


CHILD = r"""
import filecmp, json, os, resource, sys, torch
from cq.config import ConvertConfig
from cq.convert import convert_file
from cq.distributed import convert_file_distributed
from cq.errors import ConfigError
from cq.memory import memory_policy
src, out, limit_mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = ConvertConfig(device="cpu", low_memory=True)
convert_file_distributed(src, out + ".warm", cfg)  # lazy imports and first-use allocations, before the limit
os.remove(out + ".warm")

def vm():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

resource.setrlimit(resource.RLIMIT_AS, (vm() + limit_mib * 2**20, resource.RLIM_INFINITY))
result = {}
try:
    convert_file_distributed(src, out, cfg, memory=memory_policy("off"))
    result["off"] = "ran"
except ConfigError as e:
    result["off"] = str(e)
convert_file_distributed(src, out, cfg, memory=memory_policy("aggressive"))
result["aggressive"] = os.path.getsize(out)
import attrs
convert_file(src, out + ".single", attrs.evolve(cfg, memory=memory_policy("aggressive")))  # the same limit
result["same"] = filecmp.cmp(out, out + ".single", shallow=False)  # 8 KiB at a time
try:
    torch.empty(os.path.getsize(src), dtype=torch.uint8)  # the limit is real: the model does not fit in memory
    result["whole"] = "allocated"
except (RuntimeError, MemoryError):
    result["whole"] = "refused"
print(json.dumps(result))
"""


@pytest.mark.slow
def test_a_model_larger_than_the_memory_limit_converts_within_the_aggressive_budget(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"blocks.{i}.fc.weight": (torch.randn(1024, 1024, generator=g) * 0.02).to(torch.bfloat16)
               for i in range(72)}
    src = tmp_path / "m.safetensors"
    write_safetensors(src, tensors)
    plans = plan_model(DictView({k: tensors[k] for k in list(tensors)[:1]}), ConvertConfig())
    budget = layer_working_set(plans[0], (1024, 1024), 2)
    limit_mib = budget // MiB + 24  # the budget and a little for the interpreter's own allocations
    assert src.stat().st_size > 2 * limit_mib * MiB  # the model is more than twice the limit
    # One malloc arena and a fixed mmap threshold: large buffers go back to the system when freed,
    # so the address space tracks what is held rather than the allocator's history.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "out.safetensors"), str(limit_mib)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(result)  # shown by pytest when an assertion below fails
    assert "streaming_mode='off'" in result["off"] and "use streaming_mode='balanced'" in result["off"]
    assert result["aggressive"] > 72 * 1024 * 1024 and result["same"] is True
    assert result["whole"] == "refused"


def test_thresholds_on_a_cpu_run_warn(tmp_path):
    from cq.distributed import convert_file_distributed

    src = tmp_path / "m.safetensors"
    write_safetensors(src, {"a.weight": torch.randn(32, 32)})
    with pytest.warns(UserWarning, match=r"\['hessian_dim'\] have no effect"):
        convert_file_distributed(src, tmp_path / "o.safetensors", ConvertConfig(device="cpu"),
                                 memory=memory_policy("balanced", streaming_thresholds={"hessian_dim": 64}))


def test_facade_streaming_thresholds_take_the_reference_keys(model_file, tmp_path):
    from cq import convert_to_int8

    base = dict(comfy_quant=True, filter_flags={}, calib_samples=64, seed=0)
    with pytest.raises(ConfigError, match="streaming_thresholds key 'a' is not one of"):
        convert_to_int8(str(model_file), str(tmp_path / "x.safetensors"), **base, streaming_thresholds={"a": 1})
    with pytest.warns(UserWarning, match="have no effect"):  # a CPU run has no GPU step to move
        convert_to_int8(str(model_file), str(tmp_path / "y.safetensors"), **base, device="cpu",
                        streaming_thresholds={"hessian_dim": 1024})
