"""askd-kernels: fused Triton kernels for the ASKD distillation loss (see ``SPEC.md``).

Pipeline of the sampled-token op, one file per stage:

* :mod:`askd_kernels.row_stats`    — (a) one pass over each vocabulary row: log q_t, ℓ_t, logsumexp
* :mod:`askd_kernels.coefficients` — (b) per-sequence suffix scans: u, ρ, G, P → λ_t and D_b
* :mod:`askd_kernels.gradient`     — (c) backward: g·κ·w·λ·(softmax − onehot)/τ
* :mod:`askd_kernels.ops`          — the autograd-aware ``torch.library`` custom ops over (a)–(c)
* :mod:`askd_kernels.torch_impl`   — the chunked PyTorch path used on CPU
* :mod:`askd_kernels.fused_linear` — the same op from hidden states and the lm_head weight, in chunks
  of rows (no tokens × vocab logits), plus ``token_logprobs``

The full-vocabulary divergence family (fkl, rkl, skl, srkl, jsd, tvd; SPEC §6):

* :mod:`askd_kernels.divergences`       — Triton kernels: two LSEs + value/Σa, then the gradient
* :mod:`askd_kernels.divergences_torch` — the chunked PyTorch path used on CPU
* :mod:`askd_kernels.divergence`        — ``divergence_loss`` and its ``torch.library`` custom ops
"""
from .askd import ASKDLoss, askd_loss
from .divergence import divergence_loss
from .fused_linear import askd_loss_from_hidden, token_logprobs
from .skew import skew_from_rewards

__all__ = ["askd_loss", "ASKDLoss", "skew_from_rewards", "divergence_loss", "askd_loss_from_hidden",
           "token_logprobs"]
__version__ = "0.1.0"
