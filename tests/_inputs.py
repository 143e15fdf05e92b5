"""The input builders every test file shares: random logits and labels with a fixed seed
(:func:`problem`) and the hypothesis strategy of the parity tests (:func:`logits_and_labels`)."""
import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def logits_and_labels(draw, *, max_T):
    """Draw a problem's shapes (odd sizes, B = 1, T = 1, V not a multiple of a block, V_s ≠ V_t both
    ways), dtype, scale and seed. Returns the seeded generator (for the caller's further random
    choices), student ``[B, T, V_s]`` and teacher ``[B, T, V_t]`` logits (standard normal × scale, in
    the dtype) and labels in ``[0, V_s)``."""
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, max_T))
    V_s = draw(st.integers(2, 70))
    V_t = draw(st.sampled_from([V_s, max(1, V_s - draw(st.integers(1, 9))), V_s + draw(st.integers(1, 9))]))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1.0, 3.0]))
    student = (torch.randn(B, T, V_s, generator=g) * scale).to(dtype)
    teacher = (torch.randn(B, T, V_t, generator=g) * scale).to(dtype)
    return g, student, teacher, torch.randint(0, V_s, (B, T), generator=g)


def problem(seed, B=2, T=6, V_s=13, V_t=None, *, dtype=torch.float32, scale=1.0, ignore=(), device="cpu"):
    """Student ``[B, T, V_s]`` and teacher ``[B, T, V_t]`` logits (standard normal × ``scale``, in
    ``dtype``; V_t defaults to V_s) and labels in ``[0, V_s)``, drawn in that order from a generator
    seeded with ``seed`` on ``device``. Labels at each index of ``ignore`` (e.g. ``(0, -1)`` or
    ``(slice(None), slice(0, 3))``) are set to −100."""
    g = torch.Generator(device=device).manual_seed(seed)
    V_t = V_s if V_t is None else V_t
    student = (torch.randn(B, T, V_s, generator=g, device=device) * scale).to(dtype)
    teacher = (torch.randn(B, T, V_t, generator=g, device=device) * scale).to(dtype)
    labels = torch.randint(0, V_s, (B, T), generator=g, device=device)
    for index in ignore:
        labels[index] = -100
    return student, teacher, labels
