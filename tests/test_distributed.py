"""Layer-parallel runs: torchrun (gloo, 2 CPU processes) writes the single-process bytes; resume; failures."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cq.convert
from cq.calibrate import hessian_finalize, hessian_init, hessian_update
from cq.io.calibration import save_calibration
from cq.config import ConvertConfig
from cq.convert import convert_file
from cq.distributed import assign_layers, convert_file_distributed, layer_cost, work_dir_for
from cq.errors import CqError
from cq.io import write_safetensors
from cq.recipes import GPTQ, RTN
from tests.model_fixture import LINEAR_KEYS, make_model_tensors

# One thread everywhere: the ranks and the reference run then do the same float arithmetic.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
CLI_ARGS = ["--optimizer", "gptq", "--save-quant-metadata", "--no-progress"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The fixture model, a real-data calibration file for its linear layers, and the single-process output."""
    d = tmp_path_factory.mktemp("dist")
    tensors = make_model_tensors()
    src = d / "m.safetensors"
    write_safetensors(src, tensors)
    g = torch.Generator().manual_seed(1)
    stats = {}
    for key in LINEAR_KEYS:
        k = tensors[key].shape[1]
        mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)  # correlated channels: H far from I
        stats[key[: -len(".weight")]] = hessian_finalize(hessian_update(hessian_init(k), torch.randn(256, k, generator=g) @ mix))
    calib = save_calibration(d / "calib.safetensors", stats)
    ref = d / "one.safetensors"
    subprocess.run([sys.executable, "-m", "cq", "-i", str(src), "-o", str(ref), "--calibration-data", str(calib),
                    *CLI_ARGS], env=ENV, check=True, capture_output=True, timeout=120)
    return src, calib, ref


def _torchrun(src, calib, out, timeout=120):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cq", "-i", str(src), "-o", str(out), "--calibration-data", str(calib), *CLI_ARGS],
                          env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_two_processes_write_the_single_process_bytes(files, tmp_path):
    src, calib, ref = files
    out = tmp_path / "two.safetensors"
    r = _torchrun(src, calib, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes() == ref.read_bytes()
    assert r.stdout.count("wrote ") == 1  # rank 0 alone prints the table and the result
    assert not work_dir_for(out).exists()  # shards removed after the verified write


def _interrupt_after(monkeypatch, n, exc=KeyboardInterrupt):
    """Make the n+1-th convert_layer call raise ``exc``; returns the list of converted keys."""
    real = cq.convert.convert_layer
    seen = []

    def flaky(plan, *a, **kw):
        if len(seen) == n:
            raise exc(f"stopped at {plan.key}")
        seen.append(plan.key)
        return real(plan, *a, **kw)

    monkeypatch.setattr(cq.convert, "convert_layer", flaky)
    return seen


@pytest.mark.slow
def test_run_interrupted_in_one_process_is_finished_by_two_with_the_same_bytes(files, tmp_path, monkeypatch,
                                                                               one_thread):
    src, calib, ref = files
    out = tmp_path / "resumed.safetensors"
    from cq.cli import build_parser
    from cq.options import build_config, values_from_cli

    args = build_parser().parse_args(["-i", str(src), "-o", str(out), "--calibration-data", str(calib), *CLI_ARGS])
    _, _, cfg = build_config(values_from_cli(args, str(out)))  # the config the CLI builds: same fingerprint
    seen = _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        convert_file_distributed(src, out, cfg)
    assert not out.exists() and len(seen) == 2
    assert len((work_dir_for(out) / "done.rank0.jsonl").read_text().splitlines()) == 2
    monkeypatch.undo()
    r = _torchrun(src, calib, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming: 2 of 6 layers" in r.stderr
    assert out.read_bytes() == ref.read_bytes()


def _cfg():
    return ConvertConfig(recipe=GPTQ(), synthetic_calibration=True, calib_samples=64, save_quant_metadata=True,
                         device="cpu")


@pytest.fixture
def model(tmp_path):
    src = tmp_path / "m.safetensors"
    write_safetensors(src, make_model_tensors())
    return src


def test_resume_converts_only_the_missing_layers_and_writes_the_same_bytes(model, tmp_path, monkeypatch):
    ref = tmp_path / "ref.safetensors"
    convert_file(model, ref, _cfg())
    out = tmp_path / "out.safetensors"
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        convert_file_distributed(model, out, _cfg())
    monkeypatch.undo()
    seen = _interrupt_after(monkeypatch, 99)
    report = convert_file_distributed(model, out, _cfg())
    assert len(seen) == len(LINEAR_KEYS) - 3
    assert [r.name for r in report.layers if r.action == "quantize"] == [k[: -len(".weight")] for k in LINEAR_KEYS]
    assert out.read_bytes() == ref.read_bytes()
    assert not work_dir_for(out).exists()


def test_a_damaged_shard_is_converted_again(model, tmp_path, monkeypatch, caplog):
    ref = tmp_path / "ref.safetensors"
    convert_file(model, ref, _cfg())
    out = tmp_path / "out.safetensors"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        convert_file_distributed(model, out, _cfg())
    monkeypatch.undo()
    shard = work_dir_for(out) / json.loads((work_dir_for(out) / "done.rank0.jsonl").read_text().splitlines()[0])["shard"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    shard.write_bytes(bytes(data))
    seen = _interrupt_after(monkeypatch, 99)
    with caplog.at_level(logging.WARNING, logger="cq.distributed"):
        convert_file_distributed(model, out, _cfg())
    assert "missing or damaged" in caplog.text
    assert len(seen) == len(LINEAR_KEYS) - 1
    assert out.read_bytes() == ref.read_bytes()


def test_work_of_another_config_is_discarded(model, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out.safetensors"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        convert_file_distributed(model, out, ConvertConfig(device="cpu"))
    monkeypatch.undo()
    seen = _interrupt_after(monkeypatch, 99)
    with caplog.at_level(logging.WARNING, logger="cq.distributed"):
        convert_file_distributed(model, out, _cfg())
    assert "another run" in caplog.text
    assert len(seen) == len(LINEAR_KEYS)  # nothing reused from the RTN run


def test_a_failing_layer_is_named_and_finished_layers_are_kept(model, tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    _interrupt_after(monkeypatch, 1, exc=ValueError)
    with pytest.raises(CqError, match=r"rank 0 of 1 failed on blocks\.0\.attn\.proj\.weight: ValueError: stopped at"):
        convert_file_distributed(model, out, ConvertConfig(device="cpu"))
    assert not out.exists()
    assert len((work_dir_for(out) / "done.rank0.jsonl").read_text().splitlines()) == 1


def test_output_equal_to_input_is_refused(model):
    from cq.errors import InputError

    with pytest.raises(InputError, match="is the input file"):
        convert_file_distributed(model, model, ConvertConfig(device="cpu"))


# -- cost model and packing ------------------------------------------------------------------------


def test_cost_is_cubic_in_k_for_hessian_recipes_and_linear_otherwise():
    from cq.convert import LayerPlan

    p = LayerPlan(key="a.weight", action="quantize", recipe=RTN())
    assert layer_cost(p.with_recipe(GPTQ()), (64, 128)) == 128 ** 3 + 64 * 128 ** 2
    assert layer_cost(p, (64, 128)) == 64 * 128


def test_assignment_balances_and_is_deterministic():
    costs = [float(c) for c in torch.randint(1, 1000, (40,), generator=torch.Generator().manual_seed(0))]
    owner = assign_layers(costs, 3)
    assert owner == assign_layers(costs, 3) and set(owner) == {0, 1, 2}
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(3)]
    assert max(loads) <= sum(costs) / 3 + max(costs)  # list scheduling's bound
    with pytest.raises(CqError, match="positive int"):
        assign_layers(costs, 0)


@pytest.mark.parametrize("values", [
    {},
    {"save_quant_metadata": True, "scaling_mode": "block", "block_size": 32},
    {"comfy_quant": False, "include_input_scale": True},
    {"fp16": True},
    {"optimizer": "quip", "calibration_lora_path": None},
    {"filter_flags": {"t5xxl": True}, "exclude_layers": "fc1"},
], ids=["rtn", "block-metadata", "legacy", "fp16", "quip", "presets-exclude"])
def test_one_process_distributed_run_writes_convert_file_bytes(model, tmp_path, values):
    """The merge writes what convert_file writes, for every kind of plan (kept, removed, biases, formats)."""
    import warnings

    from cq.options import build_config

    base = dict(input_file=str(model), output_file="x", comfy_quant=True, filter_flags={}, calib_samples=64, seed=0)
    _, _, cfg = build_config({**base, **{k: v for k, v in values.items() if v is not None}, "device": "cpu"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy layout's "vanilla ComfyUI loads it unquantized" note
        ref = convert_file(model, tmp_path / "ref.safetensors", cfg)
        got = convert_file_distributed(model, tmp_path / "out.safetensors", cfg)
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert (got.kept, got.removed, [r.name for r in got.layers]) == (ref.kept, ref.removed, [r.name for r in ref.layers])
    assert [r.metrics for r in got.layers] == [r.metrics for r in ref.layers] and got.notes == ref.notes
