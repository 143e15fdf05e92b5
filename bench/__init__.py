"""Benchmarks of askd_kernels against straightforward PyTorch (eager and torch.compile) and Liger-Kernel.

    python -m bench                       # the main grid: 'gpu' on CUDA, 'cpu' (< 3 min on 2 cores) otherwise
    python -m bench --list                # what the grid would measure
    python -m bench --ops askd,jsd --tokens 4096,16384 --models qwen2,gemma2
    python -m bench --grid askd-core      # the headline case and its targets (--case askd-core too)
    python -m bench --results-root bench/results   # write the committed results instead of build/bench-results
    python -m bench.plot                  # plots + summary.md of the results folders
    pytest bench/ --benchmark-only        # pytest-benchmark: small CPU cases; large ones on a GPU

One pipeline, in ``grid.run_grid``: for each group of cells, measure (``measure``: timing and memory,
of the ops and providers of ``ops``, the PyTorch losses of ``baselines``), derive (``grid.derive``,
with the traffic model ``ops.Op.bytes_moved``), write (``results``: records and files). Around it:
``grid`` (the named grids, the headline case ``askd-core`` and its targets among them), ``cli`` (the
command line) and ``plot`` (PNG and markdown). Lives in the source tree, not in the installed package;
needs ``askd_kernels``, torch, triton on CUDA, and optionally tqdm (progress bar), matplotlib (plots)
and liger-kernel (the "liger" provider).
"""
from .cli import main

__all__ = ["main"]
