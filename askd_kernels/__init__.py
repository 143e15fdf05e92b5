"""askd-kernels: fused Triton kernels for the ASKD distillation loss and the divergences it is
compared with. The mathematics and the public contract are in ``docs/contract.md``.

Every op family has the same shape — ``api.py`` (the public function), ``ops.py`` (its
``torch.library`` custom ops with fakes and autograd), Triton kernels, ``cpu.py`` (the chunked
PyTorch path) — and :mod:`askd_kernels.backend` picks the implementation per call.

* :mod:`askd_kernels.askd` — the sampled-token ASKD loss, a three-stage pipeline:
  ``triton_row_stats`` (a: one pass over each vocabulary row: log q_t, ℓ_t, logsumexp) →
  ``triton_coefficients`` (b: per-sequence suffix scans: u, ρ, G, P → λ_t and D_b) →
  ``triton_gradient`` (c: backward, g·κ·w·λ·(softmax − onehot)/τ); ``fused_linear`` runs the same
  stages from hidden states and the lm_head weight in chunks of rows (``askd_loss_from_hidden``,
  ``token_logprobs``).
* :mod:`askd_kernels.divergence` — the full-vocabulary family (fkl, rkl, skl, srkl, jsd, tvd).
* :mod:`askd_kernels._packed` — packed rows (``cu_seqlens`` / ``position_ids``): the index maps
  between the tokens and the ``[S, L]`` sequence layout that only the coefficient stage needs.
* :mod:`askd_kernels.skew` — skewness α from rewards.
* :mod:`askd_kernels.distributed` — data parallel: the ``"mean"`` denominator over all ranks
  (``ddp_num_items``, ``global_num_items``); ``skew_from_rewards`` takes a ``process_group``.
* :mod:`askd_kernels._triton_math` / :mod:`askd_kernels._torch_math` — the shared building blocks
  (online log-sum-exp, log-mixture, divergence terms), once per backend.
* :mod:`askd_kernels.integrations.hf` — Algorithm 1 with ``transformers`` models (optional).
"""
from .askd import ASKDLoss, askd_loss, askd_loss_from_hidden, token_logprobs
from .divergence import divergence_loss
from .skew import skew_from_rewards

__all__ = ["askd_loss", "ASKDLoss", "skew_from_rewards", "divergence_loss", "askd_loss_from_hidden",
           "token_logprobs"]
__version__ = "0.1.0"
