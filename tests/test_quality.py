"""Tests for cq.quality (QualityReporter, compute_*) and cq.logs (levels, handlers, idempotence)."""

import io
import logging
import math

import pytest
import torch

from cq import logs
from cq.errors import ConfigError
from cq.quality import (
    QualityReporter,
    compute_max_error,
    compute_mse,
    compute_quality_metrics,
    compute_sqnr,
)
from cq.transforms import metrics as M


def _pair(n, k, noise, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return w, w + noise * torch.randn(n, k, generator=g)


def test_free_functions_delegate_to_cq_metrics():
    w, q = _pair(32, 48, 0.01, seed=1)
    assert compute_mse(w, q) == M.mse(w, q)
    assert compute_sqnr(w, q) == M.sqnr_db(w, q)
    assert compute_max_error(w, q) == M.max_error(w, q)
    assert compute_quality_metrics(w, q) == {"mse": M.mse(w, q), "sqnr": M.sqnr_db(w, q),
                                             "max_error": M.max_error(w, q)}
    # float64 reference values
    e = (w.double() - q.double())
    assert math.isclose(compute_mse(w, q), float((e ** 2).mean()), rel_tol=1e-12)
    assert math.isclose(compute_sqnr(w, q), 10 * math.log10(float((w.double() ** 2).sum() / (e ** 2).sum())),
                        rel_tol=1e-12)
    assert compute_sqnr(w, w) == math.inf
    with pytest.raises(ValueError, match=r"original \[32, 48\] and quantized \[48, 32\]"):
        compute_quality_metrics(w, q.t())


def test_reporter_summary_excludes_inf_and_counts_below_threshold():
    r = QualityReporter(threshold=30.0)
    assert r.summary == {"mean_sqnr": 0.0, "below_threshold": 0, "total_layers": 0, "exact_layers": 0}
    assert r.get_report_string() == "No quality metrics collected."
    noises = {"b.fc": 0.001, "a.fc": 0.1, "c.fc": 0.0}
    for i, (name, noise) in enumerate(noises.items()):
        w, q = _pair(16, 16, noise, seed=10 + i)
        r.add_layer(name, w, q, w8a8=0.5 * noise)
    s = r.summary
    finite = [r.layers[n]["sqnr"] for n in ("a.fc", "b.fc")]
    assert s["total_layers"] == 3 and s["exact_layers"] == 1
    assert math.isclose(s["mean_sqnr"], sum(finite) / 2)
    assert s["below_threshold"] == sum(x < 30.0 for x in finite) == 1
    assert r.reports is r.layers and r.layers["b.fc"]["w8a8"] == 0.0005
    # replacing a layer does not double-count it
    r.add_layer("a.fc", *_pair(16, 16, 0.001, seed=99))
    assert r.summary["total_layers"] == 3 and r.summary["below_threshold"] == 0
    only_exact = QualityReporter()
    only_exact.add_layer("x", torch.ones(2, 2), torch.ones(2, 2))
    assert only_exact.summary["mean_sqnr"] == math.inf


def test_report_table_is_sorted_by_name_and_shows_extras():
    r = QualityReporter(threshold=40.0)
    for i, name in enumerate(["z.last", "a.first", "m.middle"]):
        r.add_layer(name, *_pair(8, 8, 0.01 * (i + 1), seed=i), w8a8=0.01 * i)
    text = r.get_report_string()
    lines = text.splitlines()
    assert lines[0] == "Quantization Quality Report:"
    assert lines[1].split("|")[0].strip() == "Layer" and lines[1].split("|")[-1].strip() == "w8a8"
    rows = [ln.split("|")[0].strip() for ln in lines[3:6]]
    assert rows == ["a.first", "m.middle", "z.last"]
    below = sum(m["sqnr"] < 40.0 for m in r.layers.values())
    assert 0 < below < 3 and f"Layers below 40 dB: {below} / 3" in text
    assert f"{r.summary['mean_sqnr']:.2f} dB" in text
    with pytest.raises(ValueError, match="^bad: "):
        r.add_layer("bad", torch.zeros(2, 3), torch.zeros(3, 2))
    d = r.as_dict()
    assert list(d["layers"]) == ["a.first", "m.middle", "z.last"] and d["threshold"] == 40.0


# ---------------------------------------------------------------------------------------------
# logging


@pytest.fixture
def clean_logging():
    yield
    logs.reset_logging()


def test_setup_logging_levels_and_idempotence(clean_logging):
    buf = io.StringIO()
    root_handlers = list(logging.getLogger().handlers)
    log = logs.setup_logging("VERBOSE", stream=buf)
    for _ in range(3):
        log = logs.setup_logging("VERBOSE", stream=buf)
    ours = [h for h in log.handlers if isinstance(h, logs._CqHandler)]  # pytest may add its capture handlers
    assert log.name == "cq" and len(ours) == 1 and not log.propagate
    assert logging.getLogger().handlers == root_handlers  # the root logger is never touched
    child = logs.get_logger("io")
    child.debug("debug")
    child.log(logs.VERBOSE, "verbose")
    child.info("normal")
    child.warning("minimal")
    assert buf.getvalue().splitlines() == ["verbose", "normal", "minimal"]
    logs.setup_logging("MINIMAL", stream=buf)
    child.info("hidden")
    assert buf.getvalue().splitlines()[-1] == "minimal"
    logs.setup_logging("debug", stream=buf)
    child.debug("shown")
    assert buf.getvalue().splitlines()[-1] == "shown"
    assert (logs.DEBUG, logs.VERBOSE, logs.NORMAL, logs.MINIMAL) == (10, 15, 20, 30)


def test_default_stream_follows_sys_stderr(clean_logging, capsys):
    logs.setup_logging("NORMAL")
    logs.get_logger().info("to stderr")
    captured = capsys.readouterr()
    assert captured.err == "to stderr\n" and captured.out == ""


def test_reset_and_bad_levels(clean_logging):
    logs.setup_logging(logs.MINIMAL, stream=io.StringIO())
    logs.reset_logging()
    log = logging.getLogger("cq")
    assert log.handlers == [] and log.propagate and log.level == logging.NOTSET
    with pytest.raises(ConfigError, match="unknown log level 'LOUD'"):
        logs.setup_logging("LOUD")
    with pytest.raises(ConfigError):
        logs.setup_logging(True)
    assert logs.get_logger("cq.x").name == "cq.x" and logs.get_logger("x.y").name == "cq.x.y"
