"""Which implementation a CPU test runs: the chunked torch path or the Triton kernels."""
import os

import pytest

# On a GPU machine the kernels are compiled for real, so CPU tensors cannot go through them; the
# CPU-tensor tests then cover the torch path and tests/test_gpu.py covers the kernels (or run the
# whole suite with TRITON_INTERPRET=1 to interpret them on CPU there too).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton_on_cpu(monkeypatch):
    """Route CPU tensors through the (interpreted) Triton kernels with blocks small enough that tiny
    test shapes still run the multi-block loops and the multi-chunk scans with their carries."""
    if not INTERPRETED:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (tests/test_gpu.py runs the kernels)")
    from askd_kernels import _triton_math
    from askd_kernels.askd import triton_coefficients

    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "triton")
    monkeypatch.setattr(_triton_math, "MAX_BLOCK", 32)
    monkeypatch.setattr(triton_coefficients, "BLOCK_T", 16)


class KernelRan(AssertionError):
    """Raised by the ``no_kernels`` fixture's sentinel when a stage runs on input it should reject."""
