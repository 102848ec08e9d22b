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
