"""askd-kernels: fused Triton kernels for the ASKD distillation loss (see ``SPEC.md``).

Pipeline of the sampled-token op, one file per stage:

* :mod:`askd_kernels.row_stats`    — (a) one pass over each vocabulary row: log q_t, ℓ_t, logsumexp
* :mod:`askd_kernels.coefficients` — (b) per-sequence suffix scans: u, ρ, G, P → λ_t and D_b
* :mod:`askd_kernels.gradient`     — (c) backward: g·κ·w·λ·(softmax − onehot)/τ
* :mod:`askd_kernels.ops`          — the autograd-aware ``torch.library`` custom ops over (a)–(c)
* :mod:`askd_kernels.torch_impl`   — the chunked PyTorch path used on CPU
"""
from .askd import ASKDLoss, askd_loss
from .skew import skew_from_rewards

__all__ = ["askd_loss", "ASKDLoss", "skew_from_rewards"]
__version__ = "0.1.0"
