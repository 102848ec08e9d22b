"""The README's pipeline example runs as written (the quick-start documentation stays true)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_pipeline_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "LayerState.from_weight" in b)
    ns: dict = {}
    exec(compile(example, "README.md", "exec"), ns)  # noqa: S102 - our own documentation
    s = ns["s"]
    assert s.format == "int8_tensorwise" and tuple(s.scale.shape) == (256, 1)
    assert s.stage_names() == ("absmax_scale", "round_to_nearest", "measure")
    assert ns["p2"](s).scale.shape == ()
    assert "w8a8" in ns["p3"](s).metrics


def _example(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if marker in b)


def test_readme_plan_and_recipe_examples_run_and_stay_short(model_file, tmp_path, monkeypatch):
    import json

    from safetensors import safe_open

    monkeypatch.chdir(tmp_path)
    for marker, out in (("def my_plan", "custom_plan.safetensors"), ("register_recipe", "own_recipe.safetensors")):
        code = _example(marker)
        assert len([ln for ln in code.splitlines() if ln.strip() and not ln.startswith(("import", "from"))]) <= 10
        ns: dict = {"src": str(model_file)}
        exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own documentation
        with safe_open(str(tmp_path / out), framework="pt") as f:
            proj_scale = f.get_tensor("blocks.0.attn.proj.weight_scale")
            fc1_scale = f.get_tensor("blocks.0.mlp.fc1.weight_scale")
            assert json.loads(bytes(f.get_tensor("blocks.0.attn.proj.comfy_quant").tolist()))["format"] == \
                "int8_tensorwise"
        assert proj_scale.shape == ()  # an attention layer: tensor scales in both examples
        assert fc1_scale.shape == ((96, 1) if marker == "def my_plan" else ())
