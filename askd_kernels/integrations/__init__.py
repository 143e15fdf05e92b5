"""Optional integrations of askd-kernels with training frameworks.

:mod:`askd_kernels.integrations.hf` — Algorithm 1 of the ASKD paper with ``transformers`` causal LMs
(sampling, rewards → α, κ, the optimisation iterations), as a loop (``ASKDDistiller``) or inside a
``transformers.Trainer`` (``ASKDTrainer``).
:mod:`askd_kernels.integrations.trl` — TRL's ``GKDTrainer`` (and trainers with the same
``generalized_jsd_loss`` hook) with its generalized JSD computed by ``divergence_loss``.
``transformers`` and ``trl`` are imported lazily there: importing this package never requires them.
"""
