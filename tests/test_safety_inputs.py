"""Issue 8, items 7 and 8: inputs recognised for what they are; the documented calls work.

Each test names the bad-input kind it covers (the report's table counts them).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import cq
from cq.io.calibration import load_calibration
from cq.cli import build_parser, default_output_name, main
from cq.errors import CqError, InputError
from cq.io import UnifiedSafetensorsLoader, read_header, write_safetensors

PICKLE_MESSAGE = "this is a PyTorch pickle checkpoint"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- item 7: pickle checkpoints --------------------------------------------------------------------


@pytest.mark.parametrize("name, legacy", [("m.ckpt", False), ("m.pt", True), ("pytorch_model.bin", False),
                                          ("disguised.safetensors", False)])
def test_pytorch_pickles_are_named_and_never_unpickled(tmp_path, name, legacy, monkeypatch):
    p = tmp_path / name
    torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=not legacy)

    def no_unpickling(*a, **kw):  # cq must never get this far
        raise AssertionError("cq unpickled a checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr("pickle.load", no_unpickling)
    monkeypatch.setattr("pickle.loads", no_unpickling)
    with pytest.raises(InputError, match=f"{PICKLE_MESSAGE} .*never unpickles"):
        read_header(p)
    with pytest.raises(InputError, match=PICKLE_MESSAGE):
        UnifiedSafetensorsLoader(p)


def test_cli_on_a_checkpoint_is_one_line(tmp_path, capsys):
    p = tmp_path / "model.ckpt"
    torch.save({"w": torch.ones(2)}, p)
    rc = main(["-i", str(p), "-o", str(tmp_path / "o.safetensors"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and PICKLE_MESSAGE in err and "header length" not in err


@pytest.mark.parametrize("raw", [b"\x80\x02", b"PK\x03\x04", b"\x80"])
def test_short_files_with_pickle_magic_are_named_too(tmp_path, raw):
    p = tmp_path / "x.safetensors"
    p.write_bytes(raw)
    err = pytest.raises(InputError, read_header, p).value
    assert (PICKLE_MESSAGE in str(err)) == (raw != b"\x80")


def test_unhashable_dtype_in_a_header_is_an_input_error(tmp_path):
    header = json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(InputError, match="unknown dtype"):
        read_header(p)


def test_deeply_nested_header_is_an_input_error(tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    p = tmp_path / "x.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(InputError, match="not a safetensors file"):
        read_header(p)


# -- item 7: the reference's calibration files --------------------------------------------------------


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"blk.fc.weight": torch.randn(32, 64, generator=_gen(0))})
    return p


def _convert(model, out, cal):
    return cq.convert_to_int8(str(model), str(out), comfy_quant=True, filter_flags={}, calib_samples=64, seed=0,
                              optimizer="gptq", calibration_data_path=str(cal))


def test_a_reference_json_entry_is_used_not_reported_missing(model, tmp_path):
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"blk.fc": {"channel_max": [1.0 + i for i in range(64)]}}))
    report = _convert(model, tmp_path / "o.safetensors", cal)
    notes = [n for r in report.layers for n in r.notes] + list(report.notes)
    assert not any("no calibration entry" in n or "no Hessian" in n for n in notes)
    assert any("diagonal Hessian from the channel statistics in cal.json" in n for n in notes)
    assert "rel_out_h" in report.quantized[0].metrics  # measured on diag(channel_max²)


@pytest.mark.parametrize("suffix", ["channel_max", "channel_mean"])
def test_a_channel_statistic_of_the_wrong_length_is_an_error_naming_the_layer(model, tmp_path, suffix):
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"blk.fc": {suffix: [1.0] * 10}}))
    with pytest.raises(InputError, match=f"blk.fc.{suffix} has 10 values but the layer has in_features=64"):
        load_calibration(cal).hessian("blk.fc", k=64)
    with pytest.raises(CqError, match="blk.fc"):
        _convert(model, tmp_path / "o.safetensors", cal)
    assert not (tmp_path / "o.safetensors").exists()


def test_negative_channel_statistics_are_an_error(tmp_path):
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"blk.fc": {"channel_max": [1.0, -2.0]}}))
    with pytest.raises(InputError, match="negative values"):
        load_calibration(cal).hessian("blk.fc", k=2)


def test_a_cq_hessian_of_the_wrong_size_is_an_error_naming_the_layer(tmp_path):
    from cq.calibrate import hessian_finalize, hessian_init, hessian_update

    st = hessian_finalize(hessian_update(hessian_init(3), torch.randn(8, 3, generator=_gen(1))))
    path = cq.save_calibration(tmp_path / "c.safetensors", {"blk.fc": st})
    with pytest.raises(InputError, match=r"blk.fc.hessian is \[3, 3\] but the layer has in_features=64"):
        load_calibration(path).hessian("blk.fc", k=64)


# -- item 8: the documented calls -----------------------------------------------------------------


def test_quip_converter_unpacks_as_the_reference_api_document_shows():
    w = torch.randn(16, 64, generator=_gen(2))
    q_tensor, scale, dequantized = cq.QuIPInt8Converter(device="cpu").convert(w, H=None)
    assert q_tensor.dtype == torch.int8 and dequantized.shape == w.shape
    r = cq.QuIPInt8Converter(device="cpu", store_transformed=True, seed=1).convert(w)
    assert r.hadamard_quip and r.s_u.shape == (16,) and r.as_reference_tuple()[3:6] == (None, r.s_u, r.s_v)


@pytest.mark.slow  # a fresh interpreter imports torch: 2-5 s
def test_cq_synthetic_is_reachable_after_a_plain_import():
    code = "import cq; w, x, h = cq.synthetic.outlier_layer(8, 16, 32, seed=0); print(tuple(w.shape))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(8, 16)"


@pytest.mark.parametrize("argv, name", [
    ([], "m_simple_int8.safetensors"),
    (["--simple"], "m_simple_int8.safetensors"),
    (["--optimizer", "gptq"], "m_gptq_int8.safetensors"),
    (["--optimizer", "quip", "--wan"], "m_quip_int8mixed.safetensors"),
    (["--scaling_mode", "block"], "m_simple_int8_bs128.safetensors"),
    (["--fp16", "--block_size", "64"], "m_simple_fp16.safetensors"),
])
def test_automatic_output_name_claims_only_what_ran(argv, name):
    args = build_parser().parse_args(["-i", "dir/m.safetensors", *argv])
    assert default_output_name(args) == f"dir/{name}"
