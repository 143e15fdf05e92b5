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


def test_rollout_stats_hand_checked():
    """The divergence estimates of rollout_stats: per-token means of log p − log q (TGOs), log q − log p
    (SGOs) and their skewed forms against m = α q + (1 − α) p, from the stored log-probs; with no
    stored old log-probs the student is run instead (same numbers); all 0 when student = teacher."""
    import dataclasses

    student, teacher, r = _rollout_batch(seed=2)
    runner = hf.ASKDDistiller(student, teacher, None, contains_five, hf.ASKDConfig(group_size=2, max_new_tokens=5))
    st = runner.rollout_stats(r)
    valid, sgo = r.labels != IG, r.student_generated
    tgo_tok, sgo_tok = valid & ~sgo[:, None], valid & sgo[:, None]
    lq, lp, a = r.old_logprobs.double(), r.teacher_logprobs.double(), r.alpha.double()[:, None]
    log_m = torch.logaddexp(a.log() + lq, (1 - a).log() + lp)
    expected = {"fkl_tgo": (lp - lq)[tgo_tok], "skl_tgo": (lp - log_m)[tgo_tok],
                "rkl_sgo": (lq - lp)[sgo_tok], "srkl_sgo": (lq - log_m)[sgo_tok]}
    for key, x in expected.items():
        assert st[key] == pytest.approx(x.mean().item(), rel=1e-9, abs=1e-12), key
    assert st["length_sgo"] == pytest.approx(valid[sgo].sum(1).double().mean().item())
    assert st["clip_frac"] == pytest.approx(r.clip[sgo].double().mean().item())
    assert st["reward_tgo"] == pytest.approx(r.rewards[~sgo].mean().item())
    again = runner.rollout_stats(dataclasses.replace(r, old_logprobs=None))
    for key in expected:
        assert again[key] == pytest.approx(st[key], rel=1e-5, abs=1e-7)
    same = hf.ASKDDistiller(teacher, teacher, None, contains_five, hf.ASKDConfig(group_size=2, max_new_tokens=5))
    st0 = same.rollout_stats(dataclasses.replace(r, old_logprobs=None))
    assert all(abs(st0[key]) < 1e-12 for key in expected)


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
    cfg = hf.ASKDConfig(importance_sampling=False, estimator="exact", gamma=1.0)  # the undiscounted G below
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
    cfg = hf.ASKDConfig(estimator="exact")
    a = hf.compute_askd_loss(student, batch, teacher=teacher, config=cfg)         # stored teacher log-probs
    b = hf.compute_askd_loss(student, {k: v for k, v in batch.items() if k != "teacher_logprobs"}, teacher=teacher,
                             config=cfg)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------ estimator "auto", rao_blackwell, baseline ------

def _grads(loss, params):
    return torch.autograd.grad(loss, params)


def test_estimator_auto_resolution():
    cfg = hf.ASKDConfig()
    assert cfg.estimator == "auto"
    assert cfg.resolved_estimator(True) == "rao_blackwell" and cfg.resolved_estimator(False) == "exact"
    assert hf.ASKDConfig(length_normalize=True).resolved_estimator(True) == "exact"
    assert hf.ASKDConfig(estimator="paper").resolved_estimator(True) == "paper"
    student, teacher, r = _rollout_batch()
    batch = r.batch()
    params = list(student.parameters())
    auto_t = hf.compute_askd_loss(student, batch, teacher=teacher)
    rb = hf.compute_askd_loss(student, batch, teacher=teacher, config=hf.ASKDConfig(estimator="rao_blackwell"))
    torch.testing.assert_close(auto_t, rb)
    for x, y in zip(_grads(hf.compute_askd_loss(student, batch, teacher=teacher), params), _grads(rb, params)):
        torch.testing.assert_close(x, y)
    # no teacher model: the stored teacher log-probs and the exact estimator
    auto_n = hf.compute_askd_loss(student, batch)
    ex = hf.compute_askd_loss(student, batch, teacher=teacher, config=hf.ASKDConfig(estimator="exact"))
    torch.testing.assert_close(auto_n, ex, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="teacher"):          # rao_blackwell needs the teacher's logits
        hf.compute_askd_loss(student, batch, config=hf.ASKDConfig(estimator="rao_blackwell"))


def test_config_rejects_bad_estimator_options():
    with pytest.raises(ValueError, match="estimator"):
        hf.ASKDConfig(estimator="rao-blackwell")
    with pytest.raises(ValueError, match="length_normalize"):
        hf.ASKDConfig(estimator="rao_blackwell", length_normalize=True)
    for kw in (dict(loss="full_vocab"), dict(loss="sft"), dict(loss="grpo"), dict(estimator="paper")):
        with pytest.raises(ValueError, match="baseline"):
            hf.ASKDConfig(baseline=True, **kw)
    student, teacher, r = _rollout_batch()
    batch = {k: v for k, v in r.batch().items() if k != "prompt_index"}
    with pytest.raises(ValueError, match="prompt_index"):
        hf.compute_askd_loss(student, batch, teacher=teacher, config=hf.ASKDConfig(baseline=True))


def test_rao_blackwell_at_gamma_0_is_the_full_vocab_loss():
    """γ = 0: no future return, the token-level full-vocabulary skl/srkl — the "w/o Monte-Carlo"
    ablation (loss="full_vocab"), value and gradient, importance weights or not."""
    student, teacher, r = _rollout_batch(seed=1)
    batch = r.batch()
    assert r.clip.any()
    params = list(student.parameters())
    fv = hf.compute_askd_loss(student, batch, teacher=teacher, config=hf.ASKDConfig(loss="full_vocab"))
    rb = hf.compute_askd_loss(student, batch, teacher=teacher, config=hf.ASKDConfig(estimator="rao_blackwell",
                                                                                 gamma=0.0))
    torch.testing.assert_close(fv, rb, atol=1e-5, rtol=1e-5)
    for x, y in zip(_grads(fv, params), _grads(rb, params)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def _future_return(batch, student, gamma=1.0):
    """F_t = G_t − u_t = γ·G_{t+1} = Σ_{t'>t} γ^k u_{t'} (k = the valid positions from t to t') of the
    sampled tokens (plain torch, hand-written), the labels' log q (with grad), the valid mask and κ."""
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=hf.position_ids_from_mask(batch["attention_mask"])).logits[:, :-1]
    lab = batch["labels"][:, 1:]
    valid = lab != IG
    lq = logits.log_softmax(-1).gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    lp = batch["teacher_logprobs"][:, 1:]
    a = batch["alpha"][:, None].double()
    u = torch.where(valid, torch.log(a + (1 - a) * (lp.double() - lq.detach().double()).exp()), 0.0)
    F_ = torch.zeros_like(u)
    running = torch.zeros_like(u[:, 0])
    for t in range(u.shape[1] - 1, -1, -1):
        F_[:, t] = gamma * running                    # running = G_{t+1}
        running = torch.where(valid[:, t], u[:, t] + gamma * running, running)
    kappa = torch.where(batch["student_generated"] & batch["clip"], 0.0, 1.0)
    return F_, lq, valid, kappa


@pytest.mark.parametrize("baseline", [False, True])
def test_rao_blackwell_gradient_is_full_vocab_plus_future_return(baseline):
    """rao_blackwell = the full-vocabulary gradient + the REINFORCE term −κ·(F_t − b_t)·∇log q_t / N on
    SGOs, with b_t (baseline=True) the mean F_t of the other unclipped SGOs to the same prompt —
    i.e. prompt_index reaches askd_loss as baseline_groups."""
    student, teacher, r = _rollout_batch(seed=1)
    batch = r.batch()
    params = list(student.parameters())
    cfg = hf.ASKDConfig(importance_sampling=False, baseline=baseline)
    g_rb = _grads(hf.compute_askd_loss(student, batch, teacher=teacher, config=cfg), params)
    g_fv = _grads(hf.compute_askd_loss(student, batch, teacher=teacher, config=hf.ASKDConfig(loss="full_vocab")),
                  params)
    F_, lq, valid, kappa = _future_return(batch, student, gamma=cfg.gamma)  # the default: the recipe's 0.5
    sgo = batch["student_generated"]
    lam = torch.where(sgo[:, None], F_, 0.0)
    if baseline:
        member = (valid & (sgo & (kappa != 0))[:, None]).double()
        same = (batch["prompt_index"][:, None] == batch["prompt_index"][None, :]).double()
        total, count = same @ (F_ * member) - F_ * member, same @ member - member
        lam = lam - torch.where(sgo[:, None] & (count > 0), total / count.clamp(min=1), 0.0)
        assert (count[sgo] > 0).any()
    surrogate = -(lam.float() * kappa[:, None] * lq * valid).sum() / valid.sum()
    g_sur = _grads(surrogate, params)
    for x, y, z in zip(g_rb, g_fv, g_sur):
        torch.testing.assert_close(x, y + z, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss", hf.LOSSES)
def test_loss_parts_sum_to_the_loss(loss):
    student, teacher, r = _rollout_batch()
    batch = r.batch()
    cfg = hf.ASKDConfig(loss=loss)
    params = list(student.parameters())
    whole = hf.compute_askd_loss(student, batch, teacher=teacher, config=cfg)
    tgo, sgo = hf.compute_askd_loss_parts(student, batch, teacher=teacher, config=cfg)
    assert (sgo is None) == (loss == "sft")
    total = tgo if sgo is None else tgo + sgo
    torch.testing.assert_close(total, whole, atol=1e-5, rtol=1e-5)
    for x, y in zip(_grads(whole, params), _grads(total, params)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
    # each part is the loss of its own rows over the whole batch's denominator
    rows = ~r.student_generated
    sub = {k: v[rows] for k, v in batch.items()}
    n = (batch["labels"][:, 1:][rows] != IG).sum() if loss == "sft" else (batch["labels"][:, 1:] != IG).sum()
    alone = hf.compute_askd_loss(student, sub, teacher=teacher, config=cfg, num_items=n)
    torch.testing.assert_close(tgo, alone, atol=1e-5, rtol=1e-5)


def test_split_gradients_hand_checked():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    a, b = (w * torch.tensor([3.0, 0.0])).sum(), (w * torch.tensor([1.0, 1.0])).sum()
    out = hf.split_gradients([a, b], [w], accumulate=True)
    assert out["grad_norm_tgo"] == pytest.approx(3.0) and out["grad_norm_sgo"] == pytest.approx(2 ** 0.5)
    assert out["grad_cos_tgo_sgo"] == pytest.approx(2 ** -0.5)
    assert w.grad.tolist() == [4.0, 1.0]
    out = hf.split_gradients([(w * 2).sum(), None], [w], accumulate=False)
    assert out["grad_norm_tgo"] == pytest.approx(8 ** 0.5) and out["grad_norm_sgo"] == 0.0
    assert out["grad_cos_tgo_sgo"] != out["grad_cos_tgo_sgo"]     # NaN: no SGO part
    assert hf.grad_split_alarm({"grad_ratio_sgo_tgo": 3.0, "grad_cos_tgo_sgo": 0.19})
    assert not hf.grad_split_alarm({"grad_ratio_sgo_tgo": 2.9, "grad_cos_tgo_sgo": 0.0})
    assert not hf.grad_split_alarm({"grad_ratio_sgo_tgo": 5.0, "grad_cos_tgo_sgo": 0.2})
    assert not hf.grad_split_alarm({"loss_mean": 1.0})


def _distiller(cfg, seed=7):
    student, teacher = tiny(seed), tiny(2, hidden=48)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    return hf.ASKDDistiller(student, teacher, opt, contains_five, cfg), student


PROMPTS = torch.tensor([[BOS, 4, SEP], [BOS, 6, SEP], [BOS, 7, SEP]])


@pytest.mark.filterwarnings("ignore::askd_kernels.integrations.hf.GradientSplitWarning")
@pytest.mark.parametrize("estimator", ["exact", "rao_blackwell"])
def test_grad_split_logging_trains_the_same(estimator):
    """log_grad_split: the same update as without it (the two parts' gradients are summed), one
    record per step, and the epoch's means; no extra keys without the flag."""
    runs = {}
    for split in (False, True):
        cfg = hf.ASKDConfig(group_size=2, max_new_tokens=4, micro_batch_size=4, estimator=estimator,
                            log_grad_split=split, baseline=True)
        runner, student = _distiller(cfg)
        torch.manual_seed(3)
        stats = runner.epoch(PROMPTS)
        runs[split] = (stats, [p.detach().clone() for p in student.parameters()], runner.step_log)
    (s0, p0, log0), (s1, p1, log1) = runs[False], runs[True]
    for x, y in zip(p0, p1):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    steps = 2 * 12 // 4                                       # T = 2 passes over 12 rows in micro-batches of 4
    assert len(log0) == len(log1) == steps
    split_keys = {"grad_norm_tgo", "grad_norm_sgo", "grad_cos_tgo_sgo", "grad_ratio_sgo_tgo", "grad_tgo_share"}
    assert not split_keys & set(s0) and split_keys <= set(s1)
    assert s0["grad_norm"] == pytest.approx(s1["grad_norm"], rel=1e-4)
    for st in log1:
        assert {"loss", "grad_norm", "grad_norm_tgo", "grad_norm_sgo", "grad_cos_tgo_sgo"} <= set(st)
        if st["grad_norm_tgo"] > 0 and st["grad_norm_sgo"] > 0:      # ‖a + b‖² = ‖a‖² + ‖b‖² + 2ab·cos
            a, b, c = st["grad_norm_tgo"], st["grad_norm_sgo"], st["grad_cos_tgo_sgo"]
            assert st["grad_norm"] == pytest.approx((a * a + b * b + 2 * a * b * c) ** 0.5, rel=1e-3)
    assert s1["grad_ratio_sgo_tgo"] == pytest.approx(s1["grad_norm_sgo"] / s1["grad_norm_tgo"])
    assert 0 <= s1["grad_clip_frac"] <= 1 and -1 <= s1["grad_cos_tgo_sgo"] <= 1


def test_grad_split_warning_once(monkeypatch):
    real = hf.split_gradients

    def noisy(*args, **kwargs):                              # the real update, the numbers first measured on a too-small rollout
        out = real(*args, **kwargs)
        return {**out, "grad_norm_tgo": 1.0, "grad_norm_sgo": 5.0, "grad_cos_tgo_sgo": 0.12}

    monkeypatch.setattr(hf, "split_gradients", noisy)
    runner, _ = _distiller(hf.ASKDConfig(group_size=2, max_new_tokens=3, log_grad_split=True))
    torch.manual_seed(0)
    with pytest.warns(hf.GradientSplitWarning, match="5.0x") as record:
        for _ in range(3):
            runner.epoch(PROMPTS)
    assert len([w for w in record if issubclass(w.category, hf.GradientSplitWarning)]) == 1
    # without the flag there are no split numbers and no warning
    runner, _ = _distiller(hf.ASKDConfig(group_size=2, max_new_tokens=3))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf.GradientSplitWarning)
        runner.epoch(PROMPTS)


def test_epoch_stats_are_documented(tmp_path):
    """Every key an epoch can return is in the stats table of docs/integration.md."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "integration.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)`", doc, flags=re.M))
    keys = set()
    for cfg in (hf.ASKDConfig(group_size=2, max_new_tokens=3, log_grad_split=True),
                hf.ASKDConfig(group_size=2, max_new_tokens=3, loss="sft")):
        runner, _ = _distiller(cfg)
        torch.manual_seed(0)
        keys |= set(runner.epoch(PROMPTS))
    assert {"lam_sgo_mean", "lam_tgo_std", "grad_tgo_share", "reward_sgo", "fkl_tgo", "srkl_sgo"} <= keys
    assert keys <= documented, sorted(keys - documented)
    # the keys ASKDTrainer adds to the Trainer's logs
    trainer, _ = _trainer(tmp_path, hf.ASKDConfig(group_size=2, max_new_tokens=3, iterations=1, log_grad_split=True),
                          mb=8, steps=1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.GradientSplitWarning)
        trainer.train()
    own = {"loss", "grad_norm", "learning_rate", "epoch", "step", "train_runtime", "train_samples_per_second",
           "train_steps_per_second", "total_flos", "train_loss"}
    logged = set().union(*map(set, trainer.state.log_history)) - own
    assert {"rollouts", "reward_sgo", "rkl_sgo", "lam_sgo_std", "grad_cos_tgo_sgo"} <= logged
    assert logged <= documented, sorted(logged - documented)


def test_lambda_statistics_rao_blackwell():
    """rao_blackwell has no sampled-token part on TGOs (λ = 0); SGO λ is the future return F_t."""
    runner, _ = _distiller(hf.ASKDConfig(group_size=2, max_new_tokens=4, collect_lambda=True))
    torch.manual_seed(0)
    stats = runner.epoch(PROMPTS)
    assert stats["lam_tgo_mean"] == 0 and stats["lam_tgo_std"] == 0
    lam = torch.cat(runner.lambdas["sgo"])
    assert lam.numel() and stats["lam_sgo_mean"] == pytest.approx(lam.double().mean().item(), rel=1e-5)
    assert torch.cat(runner.lambdas["tgo"]).abs().max() == 0


def test_trainer_compute_loss(tmp_path):
    pytest.importorskip("accelerate")          # transformers.Trainer needs it
    student, teacher, r = _rollout_batch()
    rows = [{k: v[i] for k, v in r.batch().items()} for i in range(len(r))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                          learning_rate=0.1, remove_unused_columns=False, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=1)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = hf.ASKDTrainer(model=student, args=args, train_dataset=rows, data_collator=hf.askd_collate,
                             teacher_model=teacher)
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_trainer_logs_the_gradient_split(tmp_path):
    pytest.importorskip("accelerate")
    student, teacher, r = _rollout_batch()
    rows = [{k: v[i] for k, v in r.batch().items()} for i in range(len(r))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=6,
                                          learning_rate=0.01, remove_unused_columns=False, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = hf.ASKDTrainer(model=student, args=args, train_dataset=rows, data_collator=hf.askd_collate,
                             teacher_model=teacher, askd_config=hf.ASKDConfig(log_grad_split=True, baseline=True))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.GradientSplitWarning)
        trainer.train()
    logged = [h for h in trainer.state.log_history if "grad_norm_tgo" in h]
    assert len(logged) == 2
    for h in logged:
        assert h["grad_norm_tgo"] >= 0 and h["grad_norm_sgo"] >= 0 and "grad_ratio_sgo_tgo" in h
        assert h["grad_cos_tgo_sgo"] != h["grad_cos_tgo_sgo"] or -1 <= h["grad_cos_tgo_sgo"] <= 1


def test_transformers_is_imported_lazily():
    import subprocess
    import sys

    code = ("import sys; import askd_kernels.integrations.hf as hf; import askd_kernels.integrations.trl; "
            "assert 'transformers' not in sys.modules and 'trl' not in sys.modules, 'imported eagerly'; "
            "hf.ASKDConfig(); hf.ASKDTrainer; assert 'transformers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------- end to end -----------

def copy_reward(prompts, responses):
    """Task: repeat the prompt's digit. 1 if exact, 0.5 if the right digit comes first, else 0."""
    return [1.0 if resp == [p[1]] else (0.5 if resp[:1] == [p[1]] else 0.0) for p, resp in zip(prompts, responses)]


@pytest.mark.filterwarnings("ignore::askd_kernels.integrations.hf.GradientSplitWarning")
@pytest.mark.parametrize("options", [{}, {"estimator": "exact", "length_normalize": True, "gamma": 1.0}],
                         ids=["default-rao_blackwell", "exact-length_normalized"])
def test_pipeline_trains(options):
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
    # The default (estimator "auto" = rao_blackwell, γ = 0.5) and the paper's sampled-token estimator
    # (γ = 1) with length_normalize=True (at γ = 0.5 that one measured 0.05 -> 0.15 here): with the plain sum G_t a random student on this task learns to end every
    # response at once (each wrong token costs up to −log α, so the shortest response minimises the
    # sampled SRKL) and its reward stays at 0; see docs/integration.md.
    cfg = hf.ASKDConfig(group_size=4, max_new_tokens=3, iterations=2, **options)
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
    assert last < 0.8 * first, (first, last)            # measured: 0.52 -> 0.02 (default), 0.58 -> 0.30
    assert r_last > r_first + 0.1, (r_first, r_last)    # measured: 0.07 -> 0.86 (default), 0.06 -> 0.20


EPOCHS = 40


# ------------------------------------------------------------- ASKDTrainer: Algorithm 1 inside --------

TRAIN_PROMPTS = [[BOS, 4, SEP], [BOS, 5, 9, SEP]]     # unequal lengths: left-padded by the trainer


def _trainer(tmp_path, cfg, *, mb, accum=1, steps, reward_fn=contains_five, rows=None, logging_steps=1, **kw):
    """An ASKDTrainer with plain SGD (constant rate) on the usual tiny student / teacher."""
    pytest.importorskip("accelerate")
    student, teacher = tiny(7), tiny(2, hidden=48)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=mb, gradient_accumulation_steps=accum,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=logging_steps, max_grad_norm=1.0,
        train_sampling_strategy="sequential", remove_unused_columns=False, seed=0)
    data = rows if rows is not None else [{"input_ids": p} for p in TRAIN_PROMPTS]
    constant = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    trainer = hf.ASKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, askd_config=cfg,
                             reward_fn=reward_fn, optimizers=(opt, constant),
                             data_collator=None if reward_fn else hf.askd_collate, **kw)
    return trainer, student


@pytest.mark.filterwarnings("ignore::askd_kernels.integrations.hf.GradientSplitWarning")
def test_trainer_runs_algorithm_1_like_the_distiller(tmp_path):
    """On-policy ASKDTrainer = ASKDDistiller.epoch, step for step: two rollouts (each sampled from
    the models as they are then), T = 2 passes of 2 steps over 8 rows, SGD, clipping at 1; the
    trainer's steps are 2 accumulated micro-batches of 2 rows, the distiller's one of 4 rows, so
    this also checks that a step's loss is divided by the whole step's tokens (num_items_in_batch).
    The same weights afterwards and, per rollout, the same reward / α / length / clip / divergence /
    λ statistics and mean loss in the Trainer's log as in the epoch's stats."""
    # (no baseline=True here: its leave-one-out groups are the rows of one forward, so 2 + 2 rows differ from 4)
    cfg = hf.ASKDConfig(group_size=2, max_new_tokens=4, iterations=2, sample_every=4)
    trainer, student = _trainer(tmp_path, cfg, mb=2, accum=2, steps=8, logging_steps=4)
    assert trainer.prompts_per_rollout == 2                     # 2 prompts x 2 x 2 sources x T=2 = 4 steps x 4 rows
    torch.manual_seed(11)
    trainer.train()
    runner, ref = _distiller(hf.ASKDConfig(group_size=2, max_new_tokens=4, iterations=2, micro_batch_size=4,
                                           max_grad_norm=1.0))
    prompts = hf.prompt_collate([{"input_ids": p} for p in TRAIN_PROMPTS], pad_token_id=PAD)
    torch.manual_seed(11)
    epochs = [runner.epoch(prompts["prompt_ids"], prompts["prompt_mask"]) for _ in range(2)]
    for a, b in zip(student.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert trainer.rollouts_sampled == 2
    logs = [h for h in trainer.state.log_history if "reward_sgo" in h]
    assert len(logs) == 2
    for log, ep in zip(logs, epochs):
        assert log["rollouts"] >= 1
        for key in ("reward_tgo", "reward_sgo", "alpha_sgo", "length_sgo", "clip_frac", "fkl_tgo", "rkl_sgo",
                    "skl_tgo", "srkl_sgo", "lam_sgo_mean", "lam_sgo_std"):
            assert log[key] == pytest.approx(ep[key], rel=1e-4, abs=1e-6), key
        assert log["loss"] == pytest.approx(ep["loss_mean"], rel=1e-4)
    assert epochs[0]["length_sgo"] != epochs[1]["length_sgo"] or epochs[0]["reward_sgo"] != epochs[1]["reward_sgo"]


def test_trainer_gradient_accumulation_is_one_big_batch(tmp_path):
    """Offline rows: 2 micro-batches of 2 rows accumulated = 1 micro-batch of 4 rows — the step's loss
    is divided by the valid tokens of the whole step (num_items_in_batch), not averaged per
    micro-batch (the on-policy path is checked against the distiller above)."""
    cfg = hf.ASKDConfig(group_size=2, max_new_tokens=4, iterations=1)
    _, _, r = _rollout_batch(seed=3)
    rows = [{k: v[i] for k, v in r.batch().items()} for i in range(8)]
    lengths = (r.labels[:8, 1:] != IG).sum(1)
    assert lengths[:2].sum() != lengths[2:4].sum()               # unequal micro-batches: the mean would differ
    weights = []
    for mb, accum in ((4, 1), (2, 2)):
        trainer, student = _trainer(tmp_path / f"{mb}", cfg, mb=mb, accum=accum, steps=2, rows=rows, reward_fn=None)
        torch.manual_seed(5)
        out = trainer.train()
        weights.append(([p.detach().clone() for p in student.parameters()], out.training_loss))
    (w1, l1), (w2, l2) = weights
    for a, b in zip(w1, w2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert l1 == pytest.approx(l2, rel=1e-5)


def test_trainer_bad_configuration_names_the_argument(tmp_path):
    pytest.importorskip("accelerate")
    with pytest.raises(ValueError, match="sample_every"):          # 1 step x 4 rows is not 2 x 2 x 2 x 2
        _trainer(tmp_path, hf.ASKDConfig(group_size=2, iterations=2, sample_every=1), mb=4, steps=1)
    with pytest.raises(ValueError, match="sample_every"):
        hf.ASKDConfig(sample_every=0)
    with pytest.raises(ValueError, match="group_size"):
        hf.ASKDConfig(group_size=0)
    with pytest.raises(TypeError, match="askd_config"):
        _trainer(tmp_path, {"group_size": 2}, mb=4, steps=1)
    with pytest.raises(TypeError, match="reward_fn"):
        _trainer(tmp_path, hf.ASKDConfig(group_size=2), mb=4, steps=1, reward_fn="contains_five")
    trainer, _ = _trainer(tmp_path, hf.ASKDConfig(group_size=2, iterations=1), mb=8, accum=2, steps=1)
    with pytest.raises(ValueError, match="train_dataset"):          # 4 prompts per rollout, 2 given
        trainer.train()
    trainer, _ = _trainer(tmp_path, hf.ASKDConfig(group_size=2, iterations=1), mb=4, steps=1,
                          rows=[{"ids": p} for p in TRAIN_PROMPTS])
    with pytest.raises(TypeError, match="input_ids"):
        trainer.train()


def test_trainer_progress_bar_only_on_a_terminal(tmp_path):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cfg = hf.ASKDConfig(group_size=2, iterations=1)
    kinds = {}
    for flag in (None, True):
        trainer, _ = _trainer(tmp_path, cfg, mb=4, steps=1, progress_bar=flag)
        kinds[flag] = {type(cb) for cb in trainer.callback_handler.callbacks}
    assert ProgressCallback not in kinds[None] and PrinterCallback in kinds[None]     # pytest: not a terminal
    assert ProgressCallback in kinds[True]
