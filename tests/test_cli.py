"""Tests for the cq command line (cq.cli): flags, automatic output name, exit codes, bad input."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from cq.cli import main
from tests.model_fixture import file_digest, make_model_tensors

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    rc = main(list(argv) + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_default_run_prints_table_and_writes_file(model_file, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc, stdout, err = _run(capsys, "-i", str(model_file), "-o", str(out), "--report-json", str(tmp_path / "r.json"))
    assert rc == 0, err
    assert out.exists() and "int8_tensorwise" in stdout and "layers quantized" in stdout
    assert (tmp_path / "r.json").read_text().startswith("{")


def test_automatic_output_name_follows_the_reference(model_file, capsys):
    # The reference's pattern, but no "_bs128" for the row scales that were written (issue 8.8).
    rc, stdout, err = _run(capsys, "-i", str(model_file), "--simple", "--wan")
    assert rc == 0, err
    assert (model_file.parent / "model_simple_int8mixed.safetensors").exists()


def test_presets_and_dash_underscore_twins(model_file, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc, stdout, err = _run(capsys, "-i", str(model_file), "-o", str(out), "--scaling-mode", "tensor",
                           "--exclude_layers", "adaLN", "--save-quant-metadata")
    assert rc == 0, err
    assert "adaLN_modulation" not in stdout


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.safetensors"
    save_file(make_model_tensors(), str(good))
    data = good.read_bytes()
    cases = {}
    cases["missing"] = tmp_path / "does_not_exist.safetensors"
    (p := tmp_path / "garbage.safetensors").write_bytes(os.urandom(4096))
    cases["not safetensors"] = p
    (p := tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = p
    (p := tmp_path / "absurd.safetensors").write_bytes(struct.pack("<Q", 2**60) + data[8:])
    cases["absurd header"] = p
    t = make_model_tensors()
    t["blocks.0.attn.proj.weight"][0, 0] = float("inf")
    save_file(t, str(p := tmp_path / "inf.safetensors"))
    cases["inf weight"] = p
    return cases


@pytest.mark.parametrize("case", ["missing", "not safetensors", "truncated", "absurd header", "inf weight"])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, capsys, case):
    src = _bad_inputs(tmp_path)[case]
    before = file_digest(src) if src.exists() else None
    listing = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out.safetensors"
    rc, stdout, err = _run(capsys, "-i", str(src), "-o", str(out))
    assert rc != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("cq: error:"), err
    assert "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == listing  # no temp files left
    if before is not None:
        assert file_digest(src) == before
    if case == "inf weight":
        assert "blocks.0.attn.proj" in err


def test_output_equal_to_input_refused(model_file, capsys):
    before = file_digest(model_file)
    rc, _, err = _run(capsys, "-i", str(model_file), "-o", str(model_file))
    assert rc != 0 and err.startswith("cq: error:") and file_digest(model_file) == before


def test_an_option_missing_its_data_is_one_line(model_file, tmp_path, capsys):
    rc, _, err = _run(capsys, "-i", str(model_file), "-o", str(tmp_path / "o.safetensors"), "--smoothquant")
    assert rc != 0 and "--calibration-data" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_python_dash_m_entry_point(model_file, tmp_path):
    out = tmp_path / "o.safetensors"
    proc = subprocess.run([sys.executable, "-m", "cq", "-i", str(model_file), "-o", str(out), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "wrote" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "cq", "-i", str(tmp_path / "nope.safetensors")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_dry_run_analyze_writes_nothing(model_file, tmp_path, capsys):
    listing = sorted(p.name for p in tmp_path.iterdir())
    rc, stdout, err = _run(capsys, "-i", str(model_file), "--dry-run", "--exclude-layers", "fc2")
    assert rc == 0, err
    assert "quantize   blocks.0.attn.proj.weight -> RTN per-row" in stdout
    assert "with_layer blocks.0.attn.proj.bias" in stdout
    assert "keep       blocks.0.mlp.fc2.weight" in stdout and "exclude_layers" in stdout
    assert "keep       token_embedding.weight" in stdout and "embedding table" in stdout
    assert stdout.rstrip().endswith("nothing written (dry run)")
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_dry_run_template_is_a_loadable_layer_config(model_file, capsys):
    from cq import load_layer_config

    rc, stdout, err = _run(capsys, "-i", str(model_file), "--dry-run", "create-template")
    assert rc == 0, err
    path = model_file.with_name("model_layer_config_template.json")
    cfg = load_layer_config(str(path))
    assert any("qkv" in k for k in cfg)
    out = model_file.with_name("o.safetensors")
    rc, stdout, err = _run(capsys, "-i", str(model_file), "-o", str(out), "--layer-config", str(path))
    assert rc == 0, err
    assert out.exists()


def test_minimal_verbosity_prints_only_warnings_and_the_summary(model_file, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    rc, stdout, err = _run(capsys, "-i", str(model_file), "-o", str(out), "--optimizer", "gptq",
                           "--scaling_mode", "block", "--block_size", "64", "--verbose", "MINIMAL")
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and "layers quantized" in lines[0] and f"wrote {out}" in lines[0]
    # per-layer fallbacks (block scales -> rows on fc1) and run notes reach stderr as warning: lines
    assert "warning: blocks.0.mlp.fc1" in err and "per-row" in err
    assert all(ln.startswith("warning: ") for ln in err.strip().splitlines())


def test_facade_report_quality_logs_the_table(model_file, tmp_path, caplog):
    import logging

    from cq import convert_to_int8

    with caplog.at_level(logging.INFO, logger="cq"):
        convert_to_int8(str(model_file), str(tmp_path / "o.safetensors"), comfy_quant=True, filter_flags={},
                        calib_samples=64, seed=0, report_quality=True)
    assert any("layers quantized" in r.getMessage() for r in caplog.records)
