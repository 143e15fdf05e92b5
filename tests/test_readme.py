"""Every ```python block of the README runs as written (in a fresh namespace, on the torch path) and
leaves a finite ``loss``. Blocks that need a model build a tiny ``transformers`` model from a config
with random weights, so nothing is downloaded; ``bash`` blocks are commands, not run here."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
TEXT = open(README, encoding="utf-8").read()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def test_readme_has_runnable_examples():
    assert len(BLOCKS) >= 6
    # no block is a sketch: nothing loads weights from outside
    assert not any("from_pretrained" in b for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block, monkeypatch):
    if "transformers" in block:
        pytest.importorskip("transformers")
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert "loss" in scope and bool(scope["loss"].isfinite())
    # a backward ran wherever the block calls it: the student got a gradient
    if ".backward()" in block:
        import torch
        leaves = [v for v in scope.values() if isinstance(v, torch.Tensor) and v.grad is not None]
        modules = [v for v in scope.values() if isinstance(v, torch.nn.Module)
                   and any(p.grad is not None for p in v.parameters())]
        assert leaves or modules


def test_stats_keys_are_documented():
    """The README's stats table lists exactly the keys ``return_stats=True`` returns."""
    import torch

    import askd_kernels as ak

    _, stats = ak.askd_loss(torch.randn(1, 3, 5), torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 5),
                            student_generated=True, alpha=0.5, return_stats=True)
    section = TEXT.split("## What to watch during training")[1].split("\n## ")[0]
    documented = set(re.findall(r"^\s*\| `([a-z_]+)` \|", section, flags=re.M))
    assert documented == set(stats), (documented, set(stats))
