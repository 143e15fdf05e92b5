"""Names ``vulture askd_kernels vulture_whitelist.py`` would report as unused but that are used from
outside the package (public API, framework hooks). Not imported by anything; vulture reads it."""
from askd_kernels.askd.api import ASKDLoss
from askd_kernels.askd.fused_linear import askd_loss_from_hidden
from askd_kernels.distributed import ddp_num_items
from askd_kernels.integrations import hf

ASKDLoss.extra_repr             # nn.Module hook: shown by repr(module)
hf.Rollouts.prompt_index        # public field of the rollouts (which prompt a response answers)
hf.Rollouts.advantage           # public field: the normalised reward r̂
hf.ASKDDistiller.epoch          # public method: one epoch of Algorithm 1
hf.__getattr__                  # module hook: ASKDTrainer is created lazily (transformers optional)
_.compute_loss                  # noqa: F821 - Trainer hook overridden by ASKDTrainer
_.num_items_in_batch            # noqa: F821 - Trainer hook's argument
askd_loss_from_hidden.__signature__  # read by inspect.signature / help()
_.loss_is_scaled_for_ga         # noqa: F821 - Trainer class attribute, read by transformers' training_step
_.get_batch_samples             # noqa: F821 - Trainer hook overridden by ASKDTrainer (rollout micro-batches, token count)
_.routed_calls                  # noqa: F821 - counters on a routed TRL generalized_jsd_loss, for users and tests
_.fallback_calls                # noqa: F821 - the same: calls passed on to TRL's own implementation
ddp_num_items                   # public API: num_items for DDP (askd_kernels.distributed)
