"""Optional integrations of askd-kernels with training frameworks.

:mod:`askd_kernels.integrations.hf` — Algorithm 1 of the ASKD paper with ``transformers`` causal LMs
(sampling, rewards → α, κ, the optimisation iterations) and a ``Trainer`` ``compute_loss``.
``transformers`` is imported lazily there: importing this package never requires it.
"""
