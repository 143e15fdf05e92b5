"""Test set-up shared by every test file.

* Without a GPU the Triton kernels run under the interpreter. ``TRITON_INTERPRET`` is read when a
  kernel is decorated, i.e. when ``askd_kernels`` is imported, so it is set here, before any test
  module imports the package.
* The ``backend`` fixture runs a test once per implementation: the chunked PyTorch path and the
  Triton kernels. For the kernels it shrinks the block sizes (and the torch path its chunk size) so
  that tiny test shapes still exercise the multi-block loops, the multi-chunk scans and the carries.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from _backends import KernelRan, use_triton_on_cpu  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci")


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    from askd_kernels import _torch_math

    monkeypatch.setenv("ASKD_KERNELS_BACKEND", request.param)
    if request.param == "triton":
        use_triton_on_cpu(monkeypatch)
        return request.param
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", 64)
    return request.param


@pytest.fixture
def no_kernels(backend, monkeypatch):
    """Both backends' stages raise ``KernelRan`` if called (the backend fixture is still applied):
    for tests that bad input is rejected before any kernel runs."""
    from askd_kernels.askd import cpu, triton_coefficients, triton_gradient, triton_row_stats

    def sentinel(*args, **kwargs):
        raise KernelRan("a kernel stage ran on invalid input")

    for stage, kernel_module in (("row_stats", triton_row_stats), ("coefficients", triton_coefficients),
                                 ("student_gradient", triton_gradient)):
        monkeypatch.setattr(cpu, stage, sentinel)
        monkeypatch.setattr(kernel_module, stage, sentinel)
    return backend
