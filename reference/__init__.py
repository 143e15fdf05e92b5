"""Slow, obvious pure-PyTorch oracle for askd-kernels tests; it implements docs/contract.md.
Shares no code with ``askd_kernels`` and must never import it."""
from .askd import askd_loss_ref
from .divergences import divergence_loss_ref
from .skew import skew_from_rewards_ref

__all__ = ["askd_loss_ref", "divergence_loss_ref", "skew_from_rewards_ref"]
