"""The tolerance rule of the test-suite, in one place.

Our result must be no further from the fp64 truth than a straightforward PyTorch implementation
computing in the input dtype (``reference`` run with ``dtype=`` that dtype), plus a small slack:

    max|ours − truth| ≤ max|naive − truth| + tol,   tol = RTOL_FP32 · (1 + max|truth|) [+ storage]

RTOL_FP32 = 1e-5: our kernels do every reduction in fp32 (unit roundoff 2^-24 ≈ 6e-8); the longest
chains in the tests (a vocabulary row of ≤ 128 entries, a suffix scan over ≤ 64 positions) add up
to ≲ 128 · 6e-8 ≈ 8e-6 of the largest magnitude involved, so 1e-5 of the tensor's scale bounds the
difference between two correct fp32 evaluations in different orders. Results stored in a low-
precision dtype (the gradient is returned in the logits' dtype) add half an ulp of that dtype,
``storage = eps(dtype)/2 · max|truth|``, since rounding once to the caller's dtype is required.
Equal infinities (e.g. log p = −inf for a label outside the teacher's vocabulary) count as exact.
"""
import torch

RTOL_FP32 = 1e-5


def abs_error(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    x, truth = x.detach().double().cpu(), truth.detach().double().cpu()
    err = (x - truth).abs()
    err = torch.where(x == truth, 0.0, err)  # equal infinities
    return torch.nan_to_num(err, nan=float("inf"))


def assert_no_worse(name, ours, truth, naive, *, stored_dtype=None):
    """Assert the tolerance rule above, with a verbose message on failure."""
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    t = truth.detach().double().cpu()
    finite = t[torch.isfinite(t)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    tol = RTOL_FP32 * (1.0 + scale)
    if stored_dtype is not None and stored_dtype != torch.float32:
        tol += torch.finfo(stored_dtype).eps / 2 * scale
    err_ours = abs_error(ours, truth)
    err_naive = abs_error(naive, truth)
    bound = (err_naive.max().item() if err_naive.numel() else 0.0) + tol
    worst = err_ours.max().item() if err_ours.numel() else 0.0
    if not worst <= bound:
        i = tuple(int(k) for k in torch.nonzero(err_ours == err_ours.max())[0])
        raise AssertionError(
            f"{name}: max error {worst:.3e} > naive's {bound - tol:.3e} + tol {tol:.3e}; "
            f"worst at {i}: ours={ours.detach().double().cpu()[i].item()!r} "
            f"truth={t[i].item()!r} naive={naive.detach().double().cpu()[i].item()!r}")
