"""Which implementation runs a call: the Triton kernels or the chunked PyTorch (CPU) path.

Every op family asks this one function, per call, with the device of its main input:

* ``ASKD_KERNELS_BACKEND=triton`` forces the Triton kernels (on CPU tensors that means the Triton
  interpreter, which needs ``TRITON_INTERPRET=1`` set before ``askd_kernels`` is imported);
* ``ASKD_KERNELS_BACKEND=torch`` forces the chunked PyTorch path;
* unset: CUDA tensors use the Triton kernels, everything else the PyTorch path.
"""
import os

import torch

BACKEND_ENV = "ASKD_KERNELS_BACKEND"


def use_triton(device: torch.device) -> bool:
    """True when tensors on ``device`` go through the Triton kernels (see the module docstring)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", "triton", "torch"):
        raise ValueError(f"{BACKEND_ENV} must be 'triton' or 'torch', got {forced!r}")
    return forced == "triton" or (forced == "" and device.type == "cuda")
