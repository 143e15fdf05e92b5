"""The sampled-token ASKD family: public functions in :mod:`.api` and :mod:`.fused_linear`, custom ops
in :mod:`.ops`, the three Triton stages (``triton_row_stats`` → ``triton_coefficients`` →
``triton_gradient``) and their CPU path :mod:`.cpu`."""
from .api import ASKDLoss, askd_loss
from .fused_linear import askd_loss_from_hidden, token_logprobs

__all__ = ["askd_loss", "ASKDLoss", "askd_loss_from_hidden", "token_logprobs"]
