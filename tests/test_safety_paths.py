"""Issue 8, items 1 and 6: no file cq reads is overwritten, no output path fails late, signals clean up.

Each test names the bad-input kind it covers (the report's table counts them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cq.cli import main
from cq.errors import ConfigError
from cq.io import write_safetensors
from cq.io.paths import check_outputs, check_writable, same_file


@pytest.fixture
def model(tmp_path):
    p = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(0)
    write_safetensors(p, {"blk.fc.weight": torch.randn(32, 64, generator=g), "blk.fc.bias": torch.randn(32, generator=g)})
    return p


def _cli(capsys, *argv):
    rc = main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def _no_temp_files(folder):
    return [p for p in os.listdir(folder) if p.startswith(".") and p.endswith(".tmp")] == []


# -- cq.io.paths --------------------------------------------------------------------------------


def test_same_file_sees_relative_spellings_symlinks_and_hard_links(model, tmp_path):
    (tmp_path / "sub").mkdir()
    os.symlink(model, tmp_path / "link.safetensors")
    os.link(model, tmp_path / "hard.safetensors")
    for other in (tmp_path / "sub" / ".." / "m.safetensors", tmp_path / "link.safetensors",
                  tmp_path / "hard.safetensors"):
        assert same_file(model, other)
    assert not same_file(model, tmp_path / "other.safetensors")


@pytest.mark.parametrize("kind", ["report_is_input", "output_is_calibration", "output_is_layer_config",
                                  "report_is_lora_in_list", "report_is_output", "output_via_symlink"])
def test_check_outputs_refuses_writing_onto_a_read_or_twice(tmp_path, kind):
    files = {n: tmp_path / n for n in ("m.safetensors", "cal.safetensors", "lc.json", "a.safetensors", "b.safetensors")}
    for p in files.values():
        p.write_bytes(b"x")
    os.symlink(files["m.safetensors"], tmp_path / "alias.safetensors")
    reads = {"-i": files["m.safetensors"], "--calibration-data": files["cal.safetensors"],
             "--layer-config": files["lc.json"], "--merge-loras": [files["a.safetensors"], files["b.safetensors"]]}
    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    out, rep, clash = {
        "report_is_input": (out, files["m.safetensors"], "-i"),
        "output_is_calibration": (files["cal.safetensors"], rep, "--calibration-data"),
        "output_is_layer_config": (files["lc.json"], rep, "--layer-config"),
        "report_is_lora_in_list": (out, files["b.safetensors"], "--merge-loras"),
        "report_is_output": (out, out, "-o"),
        "output_via_symlink": (tmp_path / "alias.safetensors", rep, "-i"),
    }[kind]
    before = {p: p.read_bytes() for p in files.values()}
    with pytest.raises(ConfigError, match=f"is the same file as {clash} "):
        check_outputs(reads, {"-o": out, "--report-json": rep})
    assert {p: p.read_bytes() for p in files.values()} == before


@pytest.mark.parametrize("kind", ["missing_folder", "path_is_folder", "parent_is_file", "empty_path"])
def test_check_writable_refuses_paths_that_would_fail_late(tmp_path, kind):
    (tmp_path / "afile").write_text("x")
    path = {"missing_folder": tmp_path / "nodir" / "r.json", "path_is_folder": tmp_path,
            "parent_is_file": tmp_path / "afile" / "r.json", "empty_path": ""}[kind]
    with pytest.raises(ConfigError, match="--report-json"):
        check_writable(path, "--report-json")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            check_writable(ro / "r.json", "-o")
    finally:
        ro.chmod(0o700)


# -- the CLI ------------------------------------------------------------------------------------


def test_report_json_naming_the_input_is_refused_and_the_model_kept(model, tmp_path, capsys):
    before = model.read_bytes()
    (tmp_path / "o").mkdir()
    rc, out, err = _cli(capsys, "-i", model, "-o", tmp_path / "o" / "x.safetensors", "--report-json", model)
    assert rc == 2 and model.read_bytes() == before
    assert err.count("\n") == 1 and "--report-json" in err and "same file as -i" in err
    assert not (tmp_path / "o" / "x.safetensors").exists()


def test_report_json_in_a_missing_folder_fails_before_the_model_is_written(model, tmp_path, capsys):
    out_path = tmp_path / "x.safetensors"
    rc, out, err = _cli(capsys, "-i", model, "-o", out_path, "--report-json", tmp_path / "nodir" / "r.json")
    assert rc == 2 and "does not exist" in err and "Traceback" not in err and err.count("\n") == 1
    assert not out_path.exists()


def test_output_that_is_the_input_through_a_symlink_is_refused(model, tmp_path, capsys):
    os.symlink(model, tmp_path / "link.safetensors")
    before = model.read_bytes()
    rc, _, err = _cli(capsys, "-i", tmp_path / "link.safetensors", "-o", model)
    assert rc == 2 and "same file as -i" in err and model.read_bytes() == before


def test_create_template_output_that_is_the_layer_config_is_refused(model, tmp_path, capsys):
    template = tmp_path / "m_layer_config_template.json"
    template.write_text('{"_default": {"format": "int8_tensorwise"}}')
    before = template.read_text()
    rc, _, err = _cli(capsys, "-i", model, "--dry-run", "create-template", "--layer-config", template)
    assert rc == 2 and "--dry-run create-template" in err and "--layer-config" in err
    assert template.read_text() == before


def test_report_and_output_naming_one_file_is_refused(model, tmp_path, capsys):
    o = tmp_path / "o.safetensors"
    rc, _, err = _cli(capsys, "-i", model, "-o", o, "--report-json", o)
    assert rc == 2 and "--report-json" in err and "same file as -o" in err and not o.exists()


def test_a_good_run_still_writes_both(model, tmp_path, capsys):
    rc, out, err = _cli(capsys, "-i", model, "-o", tmp_path / "o.safetensors", "--report-json", tmp_path / "r.json")
    assert rc == 0, err
    assert (tmp_path / "o.safetensors").exists() and (tmp_path / "r.json").read_text().startswith("{")


# -- signals ------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_remove_the_temporary_output(model, tmp_path, capsys, monkeypatch, signame):
    from cq.io.writer import SafetensorsWriter

    sig = getattr(signal, signame)
    add = SafetensorsWriter.add

    def add_then_signal(self, *a, **kw):  # the temporary file exists by now
        add(self, *a, **kw)
        os.kill(os.getpid(), sig)

    monkeypatch.setattr(SafetensorsWriter, "add", add_then_signal)
    previous = signal.getsignal(sig)
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    rc, _, err = _cli(capsys, "-i", model, "-o", out)
    assert rc == 128 + sig and f"stopped by {signame}" in err and err.count("\n") == 1
    assert os.listdir(out.parent) == []  # neither the output nor a temporary file
    assert signal.getsignal(sig) == previous  # main() restores the handlers it installed


def test_ctrl_c_during_start_up_prints_one_line(model, capsys, monkeypatch):
    import cq.logs

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cq.logs, "setup_logging", interrupted)
    rc, _, err = _cli(capsys, "-i", model)
    assert rc == 130 and err == "cq: interrupted; no output was written\n"


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_ctrl_c_while_torch_imports_prints_one_line(model):
    # Before main() runs, `import cq` spends ~2 s importing torch; cq._startup makes a Ctrl-C there
    # one line too. SIGINT is reset to the default in the child (a test runner may ignore it).
    proc = subprocess.Popen([sys.executable, "-m", "cq", "-i", str(model)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)  # the interpreter is up (its SIGINT handler installed) and importing torch
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert err == "cq: interrupted; no output was written\n" and out == ""
    assert proc.returncode in (-signal.SIGINT, 130)


def test_report_flags_under_dry_run_are_not_silently_ignored(model, tmp_path, capsys):
    rc, out, err = _cli(capsys, "-i", model, "--dry-run", "--report-json", tmp_path / "r.json")
    assert rc == 0 and "warning: --report-json not written: --dry-run converts nothing" in err
    assert not (tmp_path / "r.json").exists()
