"""Tests for cq.calibrate (Hessian fold, capture) and cq.io.calibration (format, reader, writer)."""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from cq.calibrate import HessianStats, capture, hessian_finalize, hessian_init, hessian_update
from cq.io.calibration import (
    FORMAT,
    attach_calibration,
    load_calibration,
    save_calibration,
    synthetic_hessian,
)
from cq.errors import ConfigError, InputError
from cq.state import LayerState


def gen(seed):
    return torch.Generator().manual_seed(seed)


def reference_stats(x):
    x64 = x.reshape(-1, x.shape[-1]).double()
    return 2.0 / x64.shape[0] * x64.T @ x64, x64.abs().amax(0), x64.mean(0)


# --- the fold ---------------------------------------------------------------------------------


def test_fold_matches_float64_reference_and_is_pure():
    xs = [torch.randn(3, 5, 6, generator=gen(i)) for i in range(3)]
    acc = hessian_init(6)
    acc1 = hessian_update(acc, xs[0])
    assert acc.count == 0 and acc.sum_xx.abs().sum() == 0  # the input accumulator is untouched
    for x in xs[1:]:
        acc1 = hessian_update(acc1, x)
    st = hessian_finalize(acc1)
    h, amax, mean = reference_stats(torch.cat([x.reshape(-1, 6) for x in xs]))
    assert st.samples == 45 and st.hessian.dtype == torch.float32
    assert torch.allclose(st.hessian.double(), h, rtol=1e-6, atol=1e-6)
    assert torch.equal(st.hessian, st.hessian.T)
    assert torch.allclose(st.input_absmax.double(), amax) and torch.allclose(st.input_mean.double(), mean, atol=1e-6)


def test_chunking_and_dtypes_do_not_change_the_result():
    x = torch.randn(1000, 8, generator=gen(1))
    whole = hessian_update(hessian_init(8), x)
    chunked = hessian_update(hessian_init(8), x, chunk=7)
    assert torch.allclose(whole.sum_xx, chunked.sum_xx, rtol=1e-12)
    fast = hessian_update(hessian_init(8), x, matmul_dtype=torch.float32)
    assert torch.allclose(whole.sum_xx, fast.sum_xx, rtol=1e-4, atol=1e-3)
    bf = hessian_update(hessian_init(8), x.to(torch.bfloat16))
    assert torch.allclose(whole.sum_xx, bf.sum_xx, rtol=0.05, atol=1.0)


def test_fold_errors():
    with pytest.raises(ConfigError):
        hessian_init(0)
    with pytest.raises(InputError, match="does not end in in_features=4"):
        hessian_update(hessian_init(4), torch.randn(2, 5))
    with pytest.raises(InputError, match="float tensors"):
        hessian_update(hessian_init(4), torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(InputError, match="1 NaN/Inf"):
        hessian_update(hessian_init(2), torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(InputError, match="no calibration tokens"):
        hessian_finalize(hessian_init(3))


# --- capture ----------------------------------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 8)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.GELU(), torch.nn.Linear(12, 4))

    def forward(self, x, *, scale=1.0):
        return self.mlp(self.proj(x) * scale)


def model():
    torch.manual_seed(0)
    return Block().eval()


def test_capture_matches_manual_activations_and_keys_by_weight_stem():
    m = model()
    xs = [torch.randn(2, 5, 6, generator=gen(i)) for i in range(3)]
    stats = capture(m, xs)
    assert sorted(stats) == ["mlp.0", "mlp.2", "proj"]
    assert set(stats) <= {k.rsplit(".", 1)[0] for k in m.state_dict()}
    with torch.no_grad():
        acts = {"proj": [], "mlp.0": [], "mlp.2": []}
        for x in xs:
            p = m.proj(x)
            a = m.mlp[0](p)
            acts["proj"].append(x)
            acts["mlp.0"].append(p)
            acts["mlp.2"].append(m.mlp[1](a))
    for key, parts in acts.items():
        h, amax, mean = reference_stats(torch.cat([p.reshape(-1, p.shape[-1]) for p in parts]))
        assert stats[key].samples == 30
        assert torch.allclose(stats[key].hessian.double(), h, rtol=1e-5, atol=1e-6)
        assert torch.allclose(stats[key].input_absmax.double(), amax, rtol=1e-6)
        assert torch.allclose(stats[key].input_mean.double(), mean, atol=1e-6)
    assert all(not mod._forward_pre_hooks for mod in m.modules())


def test_capture_item_kinds_name_map_layers_and_max_tokens():
    m = model()
    calls = []

    def items():
        for i in range(10):
            calls.append(i)
            yield {"x": torch.randn(4, 6, generator=gen(i)), "scale": 2.0}

    stats = capture(m, items(), name_map="model.diffusion_model.", layers=["proj", "mlp.2"], max_tokens=8)
    assert sorted(stats) == ["model.diffusion_model.mlp.2", "model.diffusion_model.proj"]
    assert all(s.samples == 8 for s in stats.values()) and calls == [0, 1]  # stopped once full
    tup = capture(m, [(torch.randn(3, 6, generator=gen(0)),)], name_map=lambda n: None if n == "proj" else n.upper())
    assert sorted(tup) == ["MLP.0", "MLP.2"]
    fwd = capture(m, [torch.randn(3, 6, generator=gen(1))], forward=lambda mod, item: mod(item, scale=0.0),
                  layers=lambda name, mod: mod.in_features == 12)
    assert list(fwd) == ["mlp.2"] and fwd["mlp.2"].samples == 3


def test_capture_removes_hooks_on_error_and_reports_bad_selection():
    m = model()

    def broken():
        yield torch.randn(2, 6)
        raise RuntimeError("dataloader died")

    with pytest.raises(RuntimeError, match="dataloader died"):
        capture(m, broken())
    assert all(not mod._forward_pre_hooks for mod in m.modules())
    with pytest.raises(InputError, match="not nn.Linear modules"):
        capture(m, [], layers=["mlp.1"])
    with pytest.raises(ConfigError, match="same key"):
        capture(m, [], name_map=lambda n: "same")
    with pytest.raises(ConfigError, match="max_tokens"):
        capture(m, [], max_tokens=0)
    assert capture(m, []) == {}


def test_capture_warns_about_training_mode_only_with_dropout():
    m = model().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capture(m, [torch.randn(2, 6)])  # no dropout: nothing to warn about
    drop = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1)).train()
    with pytest.warns(UserWarning, match="training mode"):
        capture(drop, [torch.randn(2, 4)])


# --- calibration files ------------------------------------------------------------------------


def stats_for(k, t, seed):
    return hessian_finalize(hessian_update(hessian_init(k), torch.randn(t, k, generator=gen(seed))))


def test_save_load_roundtrip_is_atomic_and_lazy(tmp_path):
    stats = {"a.fc": stats_for(4, 20, 0), "b.fc": stats_for(3, 20, 1)}
    path = tmp_path / "sub" / "calib.safetensors"
    assert save_calibration(path, stats, metadata={"model": "test"}) == path
    assert os.listdir(path.parent) == ["calib.safetensors"]  # no temp file left behind
    cal = load_calibration(path)
    assert cal.kind == "cq" and cal.layers == ("a.fc", "b.fc") and cal.samples == 20 and len(cal) == 2
    assert cal.metadata["format"] == FORMAT and cal.metadata["model"] == "test"
    for key, st in stats.items():
        assert torch.equal(cal.hessian(key), st.hessian)
        assert torch.equal(cal.input_absmax(key), st.input_absmax)
        assert torch.equal(cal.input_mean(key), st.input_mean)
        assert cal.layer_samples(key) == 20
    assert cal.hessian("c.fc") is None and cal.input_scale("a.fc") is None and "c.fc" not in cal
    save_calibration(path, {"a.fc": stats_for(4, 30, 2)})  # replaces the old file in one step
    assert load_calibration(path).layers == ("a.fc",)


def test_layers_with_different_token_counts_store_samples_per_layer(tmp_path):
    path = tmp_path / "c.safetensors"
    save_calibration(path, {"a": stats_for(2, 5, 0), "b": stats_for(2, 9, 1)})
    cal = load_calibration(path)
    assert cal.samples == 9 and cal.layer_samples("a") == 5 and cal.layer_samples("b") == 9


def test_save_rejects_bad_stats(tmp_path):
    good = stats_for(3, 4, 0)
    with pytest.raises(InputError, match="no layers"):
        save_calibration(tmp_path / "x.safetensors", {})
    bad = HessianStats(hessian=good.hessian, input_absmax=torch.ones(4), input_mean=good.input_mean, samples=4)
    with pytest.raises(InputError, match=r"a.input_absmax must be \[3\]"):
        save_calibration(tmp_path / "x.safetensors", {"a": bad})
    with pytest.raises(ConfigError, match="reserved"):
        save_calibration(tmp_path / "x.safetensors", {"a": good}, metadata={"samples": "3"})
    assert not (tmp_path / "x.safetensors").exists()


def write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("tensors,metadata,match", [
    ({"a.hessian": torch.eye(3)[:2]}, {"format": FORMAT, "samples": "4"}, "must be square"),
    ({"a.hessian": torch.eye(3), "a.input_mean": torch.zeros(4)}, {"format": FORMAT, "samples": "4"}, r"must be \[3\]"),
    ({"a.hessian": torch.eye(3)}, {"format": FORMAT}, "no token count"),
    ({"a.hessian": torch.eye(3)}, {"format": FORMAT, "samples": "many"}, "must be an integer"),
    ({"a.hessian": torch.eye(3)}, {"format": "cq-calibration-9", "samples": "4"}, "not supported"),
    ({"a.input_mean": torch.zeros(3)}, {"format": FORMAT, "samples": "4"}, "no a.hessian"),
    ({"a.hessian": torch.eye(3), "a.weird": torch.eye(3)}, {"format": FORMAT, "samples": "4"}, "unexpected tensor"),
    ({"a.weight": torch.eye(3)}, None, "no calibration entries"),
])
def test_load_rejects_malformed_files_with_clear_errors(tmp_path, tensors, metadata, match):
    with pytest.raises(InputError, match=match):
        load_calibration(write(tmp_path / "bad.safetensors", tensors, metadata))


def test_load_validates_tensors_on_access(tmp_path):
    asym = torch.eye(3)
    asym[0, 1] = 0.5
    nan = torch.eye(3)
    nan[1, 1] = float("nan")
    cal = load_calibration(write(tmp_path / "c.safetensors", {"a.hessian": asym, "b.hessian": nan},
                                 {"format": FORMAT, "samples": "4"}))
    with pytest.raises(InputError, match="a.hessian is not symmetric"):
        cal.hessian("a")
    with pytest.raises(InputError, match="b.hessian has 1 NaN/Inf"):
        cal.hessian("b")


def test_load_rejects_missing_directory_and_garbage(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_calibration(tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="directory"):
        load_calibration(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_calibration(junk)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(InputError, match="not a valid JSON"):
        load_calibration(bad_json)
    with pytest.raises(InputError, match="must be a number"):
        load_calibration(_json(tmp_path, {"a": "high"}))


def _json(tmp_path, data):
    p = tmp_path / "ref.json"
    p.write_text(json.dumps(data))
    return p


def test_reference_formats_give_channel_stats_and_a_diagonal_hessian(tmp_path):
    # issue 8.7: a reference entry is used, as diag(channel_mean²); an input_scale alone gives none
    cal = load_calibration(_json(tmp_path, {"a.fc": {"channel_max": [1.0, 2.0], "channel_mean": [0.5, 0.25],
                                                    "input_scale": 0.02}, "b.fc": 0.5}))
    assert cal.kind == "reference" and cal.layers == ("a.fc", "b.fc")
    assert cal.hessian("a.fc").tolist() == [[0.25, 0.0], [0.0, 0.0625]] and cal.hessian_kind("a.fc") == "diagonal"
    assert cal.hessian("b.fc") is None and cal.hessian_kind("b.fc") is None and cal.input_mean("a.fc") is None
    assert cal.input_absmax("a.fc").tolist() == [1.0, 2.0] and cal.input_abs_mean("a.fc").tolist() == [0.5, 0.25]
    assert cal.input_scale("a.fc") == pytest.approx(0.02) and cal.input_scale("b.fc") == 0.5
    st = load_calibration(write(tmp_path / "ref.safetensors", {"a.fc.channel_max": torch.tensor([3.0, 4.0]),
                                                               "a.fc.input_scale": torch.tensor([0.1]),
                                                               "a.fc.other": torch.ones(1)}))
    assert st.kind == "reference" and st.input_absmax("a.fc").tolist() == [3.0, 4.0]
    assert st.input_scale("a.fc") == pytest.approx(0.1) and st.layer_samples("a.fc") is None


def test_attach_calibration(tmp_path):
    path = tmp_path / "c.safetensors"
    save_calibration(path, {"blk.fc": stats_for(4, 10, 0)})
    cal = load_calibration(path)
    state = attach_calibration(LayerState.from_weight("blk.fc", torch.randn(2, 4)), cal)
    assert torch.equal(state.hessian, cal.hessian("blk.fc")) and state.meta["calibration"]["samples"] == 10
    missing = attach_calibration(LayerState.from_weight("other", torch.randn(2, 4)), cal)
    assert missing.hessian is None and "no Hessian for other" in missing.notes[-1]
    with pytest.raises(InputError, match="in_features=5"):
        attach_calibration(LayerState.from_weight("blk.fc", torch.randn(2, 5)), cal)


def test_synthetic_hessian_is_deterministic_and_not_data_aware():
    h = synthetic_hessian(16, samples=2048, seed=3)
    assert torch.equal(h, synthetic_hessian(16, samples=2048, seed=3))
    assert not torch.equal(h, synthetic_hessian(16, samples=2048, seed=4))
    assert torch.allclose(h, 2 * torch.eye(16), atol=0.3)  # Gaussian noise: ≈ 2·I, nothing learned
    a = torch.randn(3, 16, generator=gen(5))
    with_lora = synthetic_hessian(16, samples=10, seed=3, lora_rows=a)
    noise = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    x = torch.cat([a, noise]).double()
    assert torch.allclose(with_lora.double(), 2 / 10 * x.T @ x, rtol=1e-5, atol=1e-5)
    only_lora = synthetic_hessian(16, samples=2, seed=0, lora_rows=a)
    assert torch.allclose(only_lora.double(), 2 / 2 * a[:2].double().T @ a[:2].double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError):
        synthetic_hessian(16, samples=0, seed=0)
    with pytest.raises(InputError, match="LoRA A matrix"):
        synthetic_hessian(16, samples=4, seed=0, lora_rows=torch.ones(2, 8))
