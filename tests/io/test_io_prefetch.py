"""Read-ahead and background writing: same tensors and bytes as the plain loops, bounded, errors surface."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from cq.errors import ConfigError, CqError
from cq.io import SafetensorsWriter, UnifiedSafetensorsLoader, write_safetensors
from cq.io.prefetch import BackgroundWriter, PrefetchView, prefetch, prefetch_file


def _tensors(n=6):
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(3 + i, 5, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
            for i in range(n)}


@pytest.mark.parametrize("zero_copy", [False, True], ids=["read", "mmap"])
def test_prefetch_file_yields_every_tensor_in_order(tmp_path, zero_copy):
    data = _tensors()
    data["empty"] = torch.zeros(0, 4)
    data["big"] = torch.randn(1100, 1024)  # > 4 MiB: the huge-page buffer path
    path = tmp_path / "m.safetensors"
    write_safetensors(path, data)
    for k, t in prefetch_file(path, depth=2, zero_copy=zero_copy):  # checked while current
        assert torch.equal(t, data[k]) and t.dtype == data[k].dtype and t.shape == data[k].shape, k
    got = list(prefetch_file(path, depth=2, zero_copy=zero_copy))  # still right after the pages were dropped
    assert [k for k, _ in got] == list(data)
    assert all(torch.equal(t, data[k]) for k, t in got)
    assert [k for k, _ in prefetch_file(path, ["t3", "t0"], zero_copy=zero_copy)] == ["t3", "t0"]
    with pytest.raises(KeyError, match="nope"):
        list(prefetch_file(path, ["t0", "nope"], zero_copy=zero_copy))


def test_read_ahead_is_bounded():
    reads = []
    data = {f"k{i}": torch.zeros(1000) for i in range(20)}

    def read(key):
        reads.append(key)
        return data[key]

    it = prefetch(read, data, depth=2)
    next(it)
    time.sleep(0.2)  # give the reader every chance to run ahead
    # one yielded, at most `depth` waiting, one read and blocked on the budget
    assert len(reads) <= 1 + 2 + 1
    it.close()
    it = prefetch(read, data, depth=5, max_bytes=4000 * 2)  # bytes bound: two 4000-byte tensors
    reads.clear()
    next(it)
    time.sleep(0.2)
    assert len(reads) <= 1 + 2 + 1
    it.close()


def test_read_error_is_raised_at_its_key_and_break_stops_the_reader():
    def read(key):
        if key == "c":
            raise OSError("disk on fire")
        return torch.ones(1)

    got = []
    with pytest.raises(OSError, match="disk on fire"):
        for k, _ in prefetch(read, ["a", "b", "c", "d"]):
            got.append(k)
    assert got == ["a", "b"]
    before = threading.active_count()
    for _ in prefetch(lambda k: torch.ones(1), range(100)):
        break
    assert threading.active_count() <= before
    with pytest.raises(ConfigError, match="depth=0"):
        next(prefetch(read, ["a"], depth=0))


def test_background_writer_writes_the_same_file(tmp_path):
    data = _tensors()
    write_safetensors(tmp_path / "plain.safetensors", data)
    with SafetensorsWriter(tmp_path / "bg.safetensors") as w, BackgroundWriter(w, depth=2) as bw:
        for k, t in data.items():
            bw.add(k, t)
    assert (tmp_path / "plain.safetensors").read_bytes() == (tmp_path / "bg.safetensors").read_bytes()


def test_background_write_error_surfaces_and_nothing_is_published(tmp_path):
    path = tmp_path / "o.safetensors"
    with pytest.raises(CqError, match="already added"):
        with SafetensorsWriter(path) as w, BackgroundWriter(w) as bw:
            bw.add("a", torch.ones(2))
            bw.add("a", torch.ones(2))  # duplicate: fails in the thread
            bw.flush()
    assert os.listdir(tmp_path) == []


def test_caller_error_aborts_the_file(tmp_path):
    path = tmp_path / "o.safetensors"
    with pytest.raises(RuntimeError, match="quantizer failed"):
        with SafetensorsWriter(path) as w, BackgroundWriter(w) as bw:
            bw.add("a", torch.ones(2))
            raise RuntimeError("quantizer failed")
    assert os.listdir(tmp_path) == []
    with SafetensorsWriter(tmp_path / "x.safetensors") as w:
        bw = BackgroundWriter(w)
        bw.close()
        with pytest.raises(ConfigError, match="after close"):
            bw.add("b", torch.ones(1))
    with UnifiedSafetensorsLoader(tmp_path / "x.safetensors") as f:
        assert f.keys() == []


def test_prefetch_view_serves_the_plan_order_and_stays_right_out_of_order(tmp_path):
    from cq.model import DictView

    data = _tensors()
    path = tmp_path / "m.safetensors"
    write_safetensors(path, data)
    with PrefetchView(DictView(data), path, list(data)) as v:
        assert v.keys() == list(data) and v.shape("t2") == tuple(data["t2"].shape)
        assert torch.equal(v.tensor("t0"), data["t0"])
        assert torch.equal(v.tensor("t3"), data["t3"])  # out of order: read directly
        for k in ["t1", "t2", "t4", "t5"]:  # t3 is skipped in the stream
            assert torch.equal(v.tensor(k), data[k]), k
        assert torch.equal(v.tensor("t0"), data["t0"])  # again, after the stream: directly
