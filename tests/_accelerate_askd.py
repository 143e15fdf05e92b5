"""``ASKDTrainer`` on tiny random Llama models, run by ``tests/test_accelerate.py`` either under
``accelerate launch`` (W = 2 processes, gloo on CPU) or as one plain process (W = 1)::

    python tests/_accelerate_askd.py OUT CASE [CASE ...]

Every case describes a batch of ``SHARES`` = 2 equal shares; a run with W processes gives each
process 2 / W of them (``per_device_train_batch_size`` scales, so does the number of prompts per
rollout), so the one-process run trains on the concatenation, in rank order, of what the two ranks
hold. Each case trains a fresh student and writes ``OUT/<case>_rank<r>.pt``: the student's gradients
at the first optimizer step (after DDP's all-reduce, before the update; no clipping), the logged
losses, the final parameters and, on-policy, the first rollout's source flags, rewards and α.

Deterministic sampling, so that the concatenated batch is reproducible in one process. On-policy,
the student and teacher are a ``LlamaForCausalLM`` subclass whose ``generate`` samples every
response on its own: the row's tokens come from ``transformers``' own sampling (``do_sample``, the
generation config ``ASKDDistiller`` builds) run on that row alone, under a torch seed that is a hash
of (the model's ``sampling_seed``, the prompt's tokens, the response's index among the responses to
that prompt in the call). So each response is a function of its prompt and the model only — not of
which process samples it, nor of the other rows in the batch — and two ranks with P prompts each
sample exactly the responses one process samples with the 2P prompts. The prompts are distinct and
all of one length (no left padding, whose width would depend on the batch), and every row is
padded to ``max_new_tokens`` (the shape does not depend on when the batch stops). The global torch
RNG is left as it was (``fork_rng``). The ``smoke`` case samples with plain ``generate``.

The rewards are a fixed function of the response tokens, with ties and some SGOs clipped.
"""
import collections
import os
import sys
import zlib

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from askd_kernels.integrations import hf

PAD, BOS, EOS, SEP = 0, 1, 2, 3
V = 12
SHARES = 2


class SeededSampler(LlamaForCausalLM):
    """``generate`` as a function of each row's prompt (see the module docstring); plain
    ``generate`` while ``sampling_seed`` is None."""

    sampling_seed = None

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        if self.sampling_seed is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask,
                                    generation_config=generation_config, **kwargs)
        width = input_ids.shape[1] + generation_config.max_new_tokens
        seen = collections.Counter()
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = tuple(ids[mask.bool()].tolist())
            k = seen[prompt]
            seen[prompt] += 1
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(repr((self.sampling_seed, prompt, k)).encode()))
                out = super().generate(input_ids=ids[None], attention_mask=mask[None],
                                       generation_config=generation_config, **kwargs)[0]
            rows.append(F.pad(out, (0, width - out.numel()), value=generation_config.pad_token_id))
        return torch.stack(rows)


def tiny(seed, hidden):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = SeededSampler(cfg)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    model.sampling_seed = seed
    return model


def reward(prompts, responses):
    """A fixed function of the tokens: ties happen (short vocabulary), 6/7 ≥ 0.7 clips some SGOs."""
    return [float((sum(r) + len(p)) % 7) / 7 for p, r in zip(prompts, responses)]


def prompts(n):
    """``n`` distinct prompts of one length: ``[BOS, a, b, SEP]``."""
    return [[BOS, 4 + i % 8, 4 + (i // 8) % 8, SEP] for i in range(n)]


# name: (config, prompts per share (on-policy) or None (offline rows), rows per share per micro-batch,
#        gradient accumulation steps, optimizer steps)
CASES = {
    # GRPO groups of 2, the default estimator (rao_blackwell), importance weights, κ clipping
    "grpo": (dict(group_size=2, max_new_tokens=4, iterations=1, sample_every=1, correct_threshold=0.7), 2, 8, 1, 1),
    # group_size 1: α normalised over the whole batch, i.e. over both ranks; exact estimator with the
    # stored teacher log-probs; two accumulated micro-batches per step
    "reinforce": (dict(group_size=1, max_new_tokens=4, iterations=1, sample_every=1, correct_threshold=0.7,
                       estimator="exact"), 4, 4, 2, 1),
    # offline rollout rows through the Trainer's own (sharded) loader; "sft" counts TGO tokens only
    "sft_offline": (dict(loss="sft", group_size=2, max_new_tokens=4, iterations=1), None, 4, 2, 1),
    # a few real steps: plain sampling, two passes per rollout, the gradient split logged
    "smoke": (dict(group_size=2, max_new_tokens=4, iterations=2, sample_every=2, log_grad_split=True), 1, 4, 1, 6),
}


def offline_rows(cfg):
    """16 rollout rows (4 prompts x 2 responses x 2 sources), the same in every process."""
    teacher, student = tiny(21, 32), tiny(22, 16)
    distiller = hf.ASKDDistiller(student, teacher, None, reward, cfg)
    p = torch.tensor(prompts(4))
    r = distiller.sample(p, torch.ones_like(p))
    first = (r.labels[0] != cfg.ignore_index).nonzero()[0, 0]
    r.labels[0, first + 1:] = cfg.ignore_index   # a one-token TGO: the ranks' TGO token counts differ
    return [{k: v[i] for k, v in r.batch().items()} for i in range(len(r))]


class FirstGradients(transformers.TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run(case, out):
    options, per_share, rows, accum, steps = CASES[case]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    scale = SHARES // world
    cfg = hf.ASKDConfig(**options)
    student, teacher = tiny(7, 16), tiny(2, 32)
    init = [p.detach().clone() for p in student.parameters()]
    if case == "smoke":
        student.sampling_seed = teacher.sampling_seed = None
    if per_share is None:
        data, reward_fn, collate = offline_rows(cfg), None, hf.askd_collate
    else:
        n = per_share * SHARES * (4 if case == "smoke" else 1)
        data, reward_fn, collate = [{"input_ids": p} for p in prompts(n)], reward, None
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, f"{case}_trainer"), max_steps=steps, per_device_train_batch_size=rows * scale,
        gradient_accumulation_steps=accum, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        max_grad_norm=0.0, train_sampling_strategy="sequential", remove_unused_columns=False, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, ddp_find_unused_parameters=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    constant = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    grads = FirstGradients()
    trainer = hf.ASKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, askd_config=cfg,
                             reward_fn=reward_fn, optimizers=(opt, constant), data_collator=collate,
                             callbacks=[grads])
    first = {}
    if reward_fn is not None:
        sample = trainer._sample

        def keep_first(prompt_batch, key):
            sample(prompt_batch, key)
            if not first:
                r = trainer._rollout
                first.update(sgo=r.student_generated.clone(), rewards=r.rewards.clone(), alpha=r.alpha.clone(),
                             advantage=r.advantage.clone(), prompts=prompt_batch["prompt_ids"].clone())

        trainer._sample = keep_first
    count = {}
    batch_samples = trainer.get_batch_samples

    def count_first(*args, **kwargs):
        batches, n = batch_samples(*args, **kwargs)
        if not count:       # the first step: this rank's valid tokens, and the count the loss receives
            tokens = sum(((b["labels"][:, 1:] != cfg.ignore_index)
                          & ~(b["student_generated"].bool()[:, None] & (cfg.loss == "sft"))).sum() for b in batches)
            count.update(local=int(tokens), num_items_in_batch=int(n))
        return batches, n

    trainer.get_batch_samples = count_first
    trainer.train()
    rank = trainer.args.process_index
    torch.save(dict(grads=grads.grads, losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
                    logs=trainer.state.log_history, params=[p.detach().clone() for p in student.parameters()],
                    init=init, rollout=first, count=count, world=trainer.args.world_size),
               os.path.join(out, f"{case}_rank{rank}.pt"))


def main():
    torch.set_num_threads(1)
    out, cases = sys.argv[1], sys.argv[2:]
    for case in cases:
        run(case, out)
    import torch.distributed as dist

    if dist.is_initialized():
        # every rank done before any tears gloo down: a rank that exits while its peer still holds
        # the group can abort the peer ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
