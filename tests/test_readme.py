"""The README's runnable examples run (every ```python block that imports askd_kernels and needs no
outside model)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), re.S)
          if "import askd_kernels" in b and "_model(" not in b]


def test_readme_has_runnable_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block, monkeypatch):
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert "loss" in scope and bool(scope["loss"].isfinite())
