"""The transformers integration (``askd_kernels.integrations.hf``): label alignment, bookkeeping,
the Trainer ``compute_loss`` path and a tiny end-to-end run of Algorithm 1. CPU, a few seconds each."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from askd_kernels import skew_from_rewards  # noqa: E402
from askd_kernels.integrations import hf  # noqa: E402

PAD, BOS, EOS, SEP = 0, 1, 2, 3
V = 12
IG = -100


def tiny(seed, hidden=32, layers=1, kind="llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    m = LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    m.generation_config.pad_token_id, m.generation_config.eos_token_id = PAD, EOS
    return m


# ------------------------------------------------------------------------ label alignment ------

def test_build_sequences_hand_checked():
    prompt = torch.tensor([[BOS, 5, 6, SEP], [PAD, BOS, 7, SEP]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    gen = torch.tensor([[8, 9, EOS, PAD, PAD],       # EOS then padding
                        [8, EOS, 9, EOS, 4]])        # tokens after the first EOS are padding
    ids, att, lab = hf.build_sequences(prompt, mask, torch.cat([prompt, gen], 1), eos_token_id=EOS,
                                       pad_token_id=PAD)
    assert ids.tolist() == [[BOS, 5, 6, SEP, 8, 9, EOS, PAD, PAD], [PAD, BOS, 7, SEP, 8, EOS, PAD, PAD, PAD]]
    assert att.tolist() == [[1, 1, 1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0, 0, 0]]
    assert lab.tolist() == [[IG, IG, IG, IG, 8, 9, EOS, IG, IG], [IG, IG, IG, IG, 8, EOS, IG, IG, IG]]
    # the loss pairs logits[:, :-1] with labels[:, 1:]: the logit at SEP (t = 3) predicts the first
    # response token, the logit at the last response token predicts EOS
    shifted = lab[:, 1:]
    assert shifted[0, 3].item() == 8 and shifted[0, 5].item() == EOS and shifted[1, 4].item() == EOS
    assert (shifted[:, :3] == IG).all()
    # reward-function view: prompts without padding, responses without EOS
    prompts, responses = hf.response_lists(ids, lab, att, EOS)
    assert prompts == [[BOS, 5, 6, SEP], [BOS, 7, SEP]] and responses == [[8, 9], [8]]


def test_build_sequences_pad_equals_eos_and_no_eos():
    prompt = torch.tensor([[BOS, 5]])
    gen = torch.tensor([[6, EOS, EOS, EOS]])         # pad_token_id == eos_token_id: only the first is a label
    ids, att, lab = hf.build_sequences(prompt, torch.ones_like(prompt), torch.cat([prompt, gen], 1),
                                       eos_token_id=EOS, pad_token_id=EOS)
    assert lab.tolist() == [[IG, IG, 6, EOS, IG, IG]] and att.tolist() == [[1, 1, 1, 1, 0, 0]]
    gen = torch.tensor([[6, 7, 8]])                  # cut at max_new_tokens: every token is a label
    _, att, lab = hf.build_sequences(prompt, torch.ones_like(prompt), torch.cat([prompt, gen], 1),
                                     eos_token_id=[EOS, 11], pad_token_id=PAD)
    assert lab.tolist() == [[IG, IG, 6, 7, 8]] and att.tolist() == [[1, 1, 1, 1, 1]]


def test_token_logprobs_alignment_and_left_padding():
    model = tiny(0).eval()
    ids = torch.tensor([[BOS, 5, SEP, 6, EOS], [PAD, BOS, SEP, 7, EOS]])
    att = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    lab = torch.tensor([[IG, IG, IG, 6, EOS], [IG, IG, IG, 7, EOS]])
    lp = hf.sequence_token_logprobs(model, ids, att, lab)
    with torch.no_grad():
        full = model(input_ids=ids[:1]).logits.log_softmax(-1)[0]
        alone = model(input_ids=ids[1:, 1:]).logits.log_softmax(-1)[0]     # row 1 without its left pad
    assert lp[:, :3].abs().max() == 0
    torch.testing.assert_close(lp[0, 3:], torch.stack([full[2, 6], full[3, EOS]]))
    # left padding: masked out and positions shifted, so the same log-probs as the unpadded prompt
    torch.testing.assert_close(lp[1, 3:], torch.stack([alone[1, 7], alone[2, EOS]]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- bookkeeping ------

def test_assign_skew_groups_sources_and_clip():
    r = torch.tensor([1., 1., 1., 1., 1., 0., 0., 0.,     # TGOs: 2 prompts × 4
                      1., .5, 0., 0., 0., 0., 0., 0.])    # SGOs
    sgo = torch.arange(16) >= 8
    alpha, clip, adv = hf.assign_skew(r, sgo, hf.ASKDConfig(group_size=4))
    torch.testing.assert_close(alpha[:8], skew_from_rewards(r[:8], group_size=4))
    torch.testing.assert_close(alpha[8:], skew_from_rewards(r[8:], group_size=4))
    assert (alpha[:4] == 0.5).all() and (alpha[12:] == 0.5).all() and alpha[8] > alpha[9] > alpha[10]
    assert clip.tolist() == [False] * 8 + [True] + [False] * 7            # correct SGOs only, never TGOs
    g = r[8:12]
    torch.testing.assert_close(adv[8:12], (g - g.mean()) / g.std(), atol=1e-4, rtol=1e-4)
    assert (adv[:4] == 0).all()
    # group_size 1: normalised over each source's batch
    alpha1, _, _ = hf.assign_skew(r, sgo, hf.ASKDConfig(group_size=1, beta=2.0))
    torch.testing.assert_close(alpha1[8:], skew_from_rewards(r[8:], beta=2.0))
    # ablations: fixed α, no clipping
    a2, c2, _ = hf.assign_skew(r, sgo, hf.ASKDConfig(adaptive_skew=False, fixed_alpha_tgo=.9,
                                                     fixed_alpha_sgo=.1, clip_correct=False))
    assert (a2[:8] == 0.9).all() and torch.allclose(a2[8:], torch.tensor(0.1)) and not c2.any()


def contains_five(prompts, responses):
    return [1.0 if 5 in resp else 0.0 for resp in responses]


def test_sample_bookkeeping():
    student, teacher = tiny(1), tiny(2, hidden=48, kind="qwen2")
    cfg = hf.ASKDConfig(group_size=3, max_new_tokens=4, micro_batch_size=4)
    runner = hf.ASKDDistiller(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), contains_five, cfg)
    prompts = torch.tensor([[BOS, 4, SEP], [BOS, 6, SEP]])
    torch.manual_seed(0)
    r = runner.sample(prompts)
    N = 2 * 2 * 3
    assert len(r) == N and r.student_generated.tolist() == [False] * 6 + [True] * 6
    assert r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1] * 2
    assert (r.input_ids[:, :3] == prompts.repeat_interleave(3, 0).repeat(2, 1)).all()
    assert (r.labels[:, :3] == IG).all()
    valid = r.labels != IG
    assert (r.attention_mask[:, 3:].bool() == valid[:, 3:]).all()      # response tokens = labels
    for row in range(N):                                                # EOS, if any, is the last label
        resp = r.labels[row][valid[row]].tolist()
        assert EOS not in resp[:-1]
        assert r.rewards[row].item() == (1.0 if 5 in resp else 0.0)
    assert (r.clip == (r.student_generated & (r.rewards >= 1))).all()
    torch.testing.assert_close(r.teacher_logprobs, hf.sequence_token_logprobs(teacher, r.input_ids,
                                                                              r.attention_mask, r.labels))
    torch.testing.assert_close(r.old_logprobs, hf.sequence_token_logprobs(student, r.input_ids,
                                                                          r.attention_mask, r.labels))
    assert (r.teacher_logprobs[~valid] == 0).all() and (r.teacher_logprobs[valid] < 0).all()
    assert ((r.alpha > 0) & (r.alpha < 1)).all()


# -------------------------------------------------------------------- compute_loss / Trainer ----

def _rollout_batch(seed=0):
    student, teacher = tiny(1), tiny(2, hidden=48)
    runner = hf.ASKDDistiller(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), contains_five,
                              hf.ASKDConfig(group_size=2, max_new_tokens=5))
    torch.manual_seed(seed)
    return student, teacher, runner.sample(torch.tensor([[BOS, 4, SEP], [BOS, 6, SEP], [BOS, 7, SEP]]))


@pytest.mark.parametrize("loss", hf.LOSSES)
def test_compute_loss_one_step(loss):
    student, teacher, r = _rollout_batch()
    cfg = hf.ASKDConfig(loss=loss)
    batch = r.batch()
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    value = hf.compute_askd_loss(student, batch, teacher=teacher, config=cfg)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(p.grad is None for p in teacher.parameters())


def test_compute_loss_gradient_is_the_reinforce_surrogate():
    """The parameter gradient of compute_askd_loss equals that of a hand-written surrogate
    −Σ λ_t·log q_t / N (λ detached; TGO λ = ρ, SGO λ = G + ρ − 1; κ = 0 for clipped SGOs), i.e. the
    shift, masks, α, κ and sources reach askd_loss as intended."""
    student, teacher, r = _rollout_batch(seed=1)
    batch = r.batch()
    assert r.clip.any() and (~r.clip & r.student_generated).any()
    cfg = hf.ASKDConfig(importance_sampling=False)
    params = list(student.parameters())
    g1 = torch.autograd.grad(hf.compute_askd_loss(student, batch, teacher=teacher, config=cfg), params)

    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    lab = batch["labels"][:, 1:]
    valid = lab != IG
    lq = logits.log_softmax(-1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    lp = batch["teacher_logprobs"][:, 1:]
    a = batch["alpha"][:, None].double()
    ratio = (lp.double() - lq.detach().double()).exp()
    u = torch.where(valid, torch.log(a + (1 - a) * ratio), 0.0)
    rho = a / (a + (1 - a) * ratio)
    G = u.flip(1).cumsum(1).flip(1)
    sgo = batch["student_generated"][:, None]
    lam = torch.where(sgo, G + rho - 1, rho) * torch.where(sgo & batch["clip"][:, None], 0.0, 1.0)
    surrogate = -(lam.float() * lq * valid).sum() / valid.sum()
    g2 = torch.autograd.grad(surrogate, params)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_generate_samples_the_forward_distribution():
    """SGOs must be on-policy for the REINFORCE-style gradient: generate's sampling = softmax."""
    model = tiny(5)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)                   # a peaked, non-uniform distribution
    runner = hf.ASKDDistiller(model, model, None, contains_five, hf.ASKDConfig(group_size=4000, max_new_tokens=1))
    prompt = torch.tensor([[BOS, 5, SEP]])
    torch.manual_seed(0)
    ids, _, _ = runner.generate(model, prompt, torch.ones_like(prompt))
    with torch.no_grad():
        q = model(input_ids=prompt).logits[0, -1].softmax(-1)
    freq = torch.bincount(ids[:, 3], minlength=V).float() / 4000
    assert (freq - q).abs().max() < 0.03                # 4 sigma of a Bernoulli(0.5) mean over 4000


def test_compute_loss_teacher_logprobs_equal_teacher_logits():
    student, teacher, r = _rollout_batch()
    batch = r.batch()
    a = hf.compute_askd_loss(student, batch, teacher=teacher)                     # stored teacher log-probs
    b = hf.compute_askd_loss(student, {k: v for k, v in batch.items() if k != "teacher_logprobs"}, teacher=teacher)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_trainer_compute_loss():
    pytest.importorskip("accelerate")          # transformers.Trainer needs it
    student, teacher, r = _rollout_batch()
    rows = [{k: v[i] for k, v in r.batch().items()} for i in range(len(r))]
    args = transformers.TrainingArguments(output_dir="/tmp/askd_trainer_test", max_steps=1, per_device_train_batch_size=4,
                                          learning_rate=0.1, remove_unused_columns=False, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=1)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = hf.ASKDTrainer(model=student, args=args, train_dataset=rows, data_collator=hf.askd_collate,
                             teacher_model=teacher)
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_transformers_is_imported_lazily():
    import subprocess
    import sys

    code = ("import sys; import askd_kernels.integrations.hf as hf; "
            "assert 'transformers' not in sys.modules, 'imported eagerly'; hf.ASKDConfig(); "
            "hf.ASKDTrainer; assert 'transformers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------- end to end -----------

def copy_reward(prompts, responses):
    """Task: repeat the prompt's digit. 1 if exact, 0.5 if the right digit comes first, else 0."""
    return [1.0 if resp == [p[1]] else (0.5 if resp[:1] == [p[1]] else 0.0) for p, resp in zip(prompts, responses)]


def test_pipeline_trains():
    torch.manual_seed(0)
    teacher = tiny(3, hidden=32)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(60):                                                 # teacher: SFT on the copy task
        d = torch.randint(4, V, (64, 1))
        ids = torch.cat([torch.full_like(d, BOS), d, torch.full_like(d, SEP), d, torch.full_like(d, EOS)], 1)
        lab = ids.clone()
        lab[:, :3] = IG
        loss = torch.nn.functional.cross_entropy(teacher(input_ids=ids).logits[:, :-1].transpose(1, 2), lab[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    student = tiny(4, hidden=16)
    # length_normalize=True: with the plain sum G_t (the default) a random student on this task
    # learns to end every response at once (each wrong token costs up to −log α, so the shortest
    # response minimises the sampled SRKL) and its reward stays at 0; see the README section.
    cfg = hf.ASKDConfig(group_size=4, max_new_tokens=3, iterations=2, length_normalize=True)
    runner = hf.ASKDDistiller(student, teacher, torch.optim.Adam(student.parameters(), lr=1e-2), copy_reward, cfg)
    history = []
    for _ in range(EPOCHS):
        d = torch.randint(4, V, (8, 1))
        history.append(runner.epoch(torch.cat([torch.full_like(d, BOS), d, torch.full_like(d, SEP)], 1)))
    k = 5
    first = sum(h["loss_mean"] for h in history[:k]) / k
    last = sum(h["loss_mean"] for h in history[-k:]) / k
    r_first = sum(h["reward_sgo"] for h in history[:k]) / k
    r_last = sum(h["reward_sgo"] for h in history[-k:]) / k
    assert min(h["reward_tgo"] for h in history) > 0.9                  # the teacher is good
    assert last < 0.8 * first, (first, last)                          # measured: 0.58 -> 0.30
    assert r_last > r_first + 0.03, (r_first, r_last)                 # measured: 0.06 -> 0.18


EPOCHS = 40
