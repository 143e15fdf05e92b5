"""Benchmarks of askd_kernels against straightforward PyTorch (eager and torch.compile) and Liger-Kernel.

    python -m bench                       # the grid: 'gpu' on CUDA, 'cpu' (< 3 min on 2 cores) otherwise
    python -m bench --list                # what the grid would measure
    python -m bench --ops askd,jsd --tokens 4096,16384 --models qwen2,gemma2
    python -m bench --case askd-core      # the core issue's single case and its targets
    python -m bench.plot                  # plots + summary.md of the results folders
    pytest bench/ --benchmark-only        # pytest-benchmark: small CPU cases; large ones on a GPU

Modules: ``ops`` (ops, inputs, providers, roofline), ``baselines`` (the PyTorch losses), ``measure``
(timing and memory), ``grid`` (the grid runner), ``results`` (records and files), ``plot`` (PNG and
markdown), ``runner`` (the command line and the single case). Lives in the source tree, not in the
installed package; needs ``askd_kernels`` for the "ours" provider, torch, triton on CUDA, and
optionally tqdm (progress bar), matplotlib (plots) and liger-kernel (the "liger" provider).
"""
from .runner import main, run

__all__ = ["main", "run"]
