"""Benchmark of askd_kernels against a plain-PyTorch ASKD loss, eager and under torch.compile.

    python -m bench                      # the issue's case on a GPU, a small embedded case on CPU
    python -m bench --providers ours,eager --out bench/results/h100.jsonl

Lives in the source tree, not in the installed package; it needs only ``askd_kernels`` (for the
"ours" provider), torch and, on CUDA, triton.
"""
from .runner import main, run

__all__ = ["main", "run"]
