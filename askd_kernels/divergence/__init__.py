"""The full-vocabulary divergence family: :func:`.api.divergence_loss`, its custom ops in :mod:`.ops`,
the Triton kernels in :mod:`.triton` and the CPU path in :mod:`.cpu`."""
from .api import divergence_loss

__all__ = ["divergence_loss"]
