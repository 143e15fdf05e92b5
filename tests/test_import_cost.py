"""Running the ops does not import ``torch._dynamo`` (0.7–2.6 s per process on the CPU machine of
``bench/results/cpu``): ``askd_kernels._custom_op`` registers the custom ops without
``torch.library.custom_op``'s ``torch._disable_dynamo`` wrapper, whose first call imports it. A fresh
interpreter, so that nothing imported by other tests hides the import."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["ASKD_KERNELS_BACKEND"] = "torch"
    import torch
    import askd_kernels as ak
    z = torch.randn(2, 3, 11, requires_grad=True)
    w = torch.randn(2, 3, 11)
    y = torch.randint(0, 11, (2, 3))
    ak.askd_loss(z, y, w, student_generated=torch.tensor([True, False]), alpha=0.4).backward()
    ak.divergence_loss(z, w, y, kind="jsd").backward()
    h = torch.randn(2, 3, 5, requires_grad=True)
    W = torch.randn(11, 5, requires_grad=True)
    ak.token_logprobs(h, W, y).sum().backward()
    assert z.grad is not None and h.grad is not None and W.grad is not None
    print("dynamo imported:", "torch._dynamo" in sys.modules)
""")


def test_running_every_op_family_does_not_import_torch_dynamo():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("dynamo imported: False"), out.stdout + out.stderr
