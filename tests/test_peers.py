"""The README's "Coming from TRL / Liger / DistiLLM / MiniLLM / Hugging Face" mappings, each checked
numerically against a re-implementation of the peer's formula in plain torch.

The peers' formulas are transcribed here (fp64, from each project's published source: TRL 1.16's
``GKDTrainer.generalized_jsd_loss``, Liger-Kernel's JSD kernel, DistiLLM's ``distillm/losses.py``,
DistiLLM-2's SRKL with q detached in the mixture, MiniLLM's ``Loss._get_advantages_and_returns``,
and ``transformers``' causal-LM loss on a tiny random model). They share nothing with the package.

Tolerance: the library computes in fp32 from fp32 logits and the transcriptions in fp64 from the
same logits, so the comparisons allow fp32 rounding of O(1) values summed over a few dozen tokens:
``rtol=1e-5, atol=1e-6`` (the parity suites bound the library's own error against its fp64 oracle;
here only the mapping is under test, and every mapped quantity is O(1)). A wrong mapping — β for
1 − β, a missing entropy term, a mean over the vocabulary, a discounted for an undiscounted count —
is off by far more (each test also checks that the unmapped reading differs).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import askd_kernels as ak

RTOL, ATOL = 1e-5, 1e-6


def close(a, b):
    torch.testing.assert_close(a.double(), b.double(), rtol=RTOL, atol=ATOL)


def _problem(seed, B=3, T=7, V=11, ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignored] = -100
    labels[0, 0] = 1  # at least one valid position
    return student, teacher, labels


def _grad(fn, logits):
    leaf = logits.detach().clone().double().requires_grad_() if fn.__name__.startswith("peer") else \
        logits.detach().clone().requires_grad_()
    value = fn(leaf)
    value.sum().backward()
    return value.detach(), leaf.grad


# ---- TRL: generalized_jsd_loss and its reductions ------------------------------------------------

def peer_trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                                  reduction="batchmean"):
    """TRL's GKDTrainer.generalized_jsd_loss, transcribed (F.kl_div(input, target, log_target=True)
    is Σ e^target (target − input), per element)."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture = torch.logsumexp(torch.stack([student_log_probs + torch.log(1 - beta_t),
                                               teacher_log_probs + torch.log(beta_t)]), dim=0)
        kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / (jsd.size(0) * jsd.size(1))
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_trl_reductions(beta):
    """TRL ``"batchmean"`` with labels = our ``"mean"``; TRL ``"sum"`` = ours; TRL ``"mean"`` averages
    over the vocabulary too (= ours / V); TRL ``"none"`` is per element (its vocabulary sum is our
    per-token ``"none"`` at the valid positions); without labels ``"batchmean"`` divides by B·T."""
    student, teacher, labels = _problem(1)
    V = student.shape[-1]
    kw = dict(kind="jsd", beta=beta, temperature=2.0)

    def ours(reduction, lab=labels):
        return lambda x: ak.divergence_loss(x, teacher, lab, reduction=reduction, **kw)

    def peer(reduction, lab=labels):
        def peer_fn(x):
            return peer_trl_generalized_jsd_loss(x, teacher.double(), lab, beta=beta, temperature=2.0,
                                                 reduction=reduction)
        return peer_fn

    for our_reduction, trl_reduction, scale in (("mean", "batchmean", 1.0), ("sum", "sum", 1.0), ("mean", "mean", V)):
        value, grad = _grad(ours(our_reduction), student)
        peer_value, peer_grad = _grad(peer(trl_reduction), student)
        close(value / scale, peer_value)
        close(grad / scale, peer_grad)
    per_token = ak.divergence_loss(student, teacher, labels, reduction="none", **kw)
    per_element = peer_trl_generalized_jsd_loss(student.double(), teacher.double(), labels, beta=beta,
                                                temperature=2.0, reduction="none")
    assert per_element.shape == ((labels != -100).sum(), V) and per_token.shape == labels.shape
    close(per_token[labels != -100], per_element.sum(-1))
    # no labels: TRL divides by B·T, our "mean" by the valid positions: all of them
    everything = torch.zeros_like(labels)
    close(ak.divergence_loss(student, teacher, everything, **kw),
          peer_trl_generalized_jsd_loss(student.double(), teacher.double(), None, beta=beta, temperature=2.0))
    # the unmapped reading is wrong: TRL's "mean" is not our "mean"
    assert not math.isclose(float(ak.divergence_loss(student, teacher, labels, **kw)),
                            float(peer_trl_generalized_jsd_loss(student.double(), teacher.double(), labels,
                                                                beta=beta, temperature=2.0, reduction="mean")),
                            rel_tol=0.1)


# ---- Liger-Kernel: JSD on log-probabilities, differentiated as free coordinates --------------------

class PeerLigerJSD(torch.autograd.Function):
    """Liger-Kernel's JSD (``LigerJSD(beta)(input=log q, target=log p, shift_labels)``), transcribed
    from its kernel: the loss per element and the gradient ``dX`` it returns for the log-prob input,
    taken with the log-probs as free coordinates, both divided by the number of valid rows."""

    @staticmethod
    def forward(ctx, X, Y, labels, beta):
        valid = (labels != -100).unsqueeze(1).to(X.dtype)
        n = valid.sum()
        Q, P = X.exp(), Y.exp()
        if beta == 0.0:
            loss, dX = P * (Y - X), -P
        elif beta == 1.0:
            loss = Q * (X - Y)
            dX = loss + Q
        else:
            M = beta * P + (1 - beta) * Q
            log_M = M.log()
            loss = beta * P * Y + (1 - beta) * Q * X - M * log_M
            dX = (1 - beta) * Q * (X - log_M)
        ctx.save_for_backward(dX * valid / n)
        return (loss * valid).sum() / n

    @staticmethod
    def backward(ctx, grad):
        (dX,) = ctx.saved_tensors
        return grad * dX, None, None, None


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_liger_jsd_takes_log_probs_and_its_gradient_is_ours_once_chained(beta):
    """Liger's ``[N, V]`` log-prob input = our flat ``[N, V]`` logits call, same value. Its gradient
    is w.r.t. the log-probs as free coordinates — not ours — and becomes our logits gradient only
    after the chain through ``log_softmax`` (dX − q·Σ dX)."""
    student, teacher, labels = _problem(2, B=1, T=9)
    z, w, y = student[0], teacher[0], labels[0]                 # Liger's flat layout
    leaf = z.clone().requires_grad_()
    ours = ak.divergence_loss(leaf, w, y, kind="jsd", beta=beta)
    ours.backward()

    log_q = F.log_softmax(z.double(), -1).requires_grad_()      # what a Liger user passes in
    log_p = F.log_softmax(w.double(), -1)
    peer = PeerLigerJSD.apply(log_q, log_p, y, beta)
    peer.backward()
    close(ours, peer)
    dX = log_q.grad
    assert not torch.allclose(dX, leaf.grad.double(), rtol=1e-3, atol=1e-4)   # not the same gradient
    q = log_q.detach().exp()
    close(leaf.grad, dX - q * dX.sum(-1, keepdim=True))          # the chain through log_softmax

    chained = z.double().clone().requires_grad_()                # the same, by autograd
    PeerLigerJSD.apply(F.log_softmax(chained, -1), log_p, y, beta).backward()
    close(leaf.grad, chained.grad)


# ---- DistiLLM: js_distance, skewed_forward_kl, skewed_reverse_kl ------------------------------------

def _distillm_terms(logits, teacher_logits, labels):
    teacher_probs = F.softmax(teacher_logits, dim=-1)
    student_probs = F.softmax(logits, dim=-1)
    mask = (labels != -100).int().view(-1)
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    return teacher_probs, student_probs, mask, inf_mask


def _masked_mean(x, mask):
    return -torch.sum(x * mask, dim=0) / torch.sum(mask, dim=0)


def peer_distillm_js_distance(logits, teacher_logits, labels, lam=0.9):
    """DistiLLM's ``js_distance`` (distillm/losses.py), transcribed."""
    teacher_probs, student_probs, mask, inf_mask = _distillm_terms(logits, teacher_logits, labels)
    mixed_logprobs = torch.log((1 - lam) * teacher_probs + lam * student_probs)
    teacher_logprobs, student_logprobs = F.log_softmax(teacher_logits, -1), F.log_softmax(logits, -1)
    prod = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
    prod = prod - torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    loss = lam * _masked_mean(prod.sum(-1).view(-1), mask)
    prod = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
    prod = prod - torch.masked_fill(teacher_probs * teacher_logprobs, inf_mask, 0)
    return loss + (1 - lam) * _masked_mean(prod.sum(-1).view(-1), mask)


def peer_distillm_skewed_forward_kl(logits, teacher_logits, labels, lam=0.1):
    teacher_probs, student_probs, mask, inf_mask = _distillm_terms(logits, teacher_logits, labels)
    mixed_logprobs = torch.log(lam * teacher_probs + (1 - lam) * student_probs)
    prod = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
    return _masked_mean(prod.sum(-1).view(-1), mask)


def peer_distillm_skewed_reverse_kl(logits, teacher_logits, labels, lam=0.1, detach_mixture=False):
    """DistiLLM's ``skewed_reverse_kl``; with ``detach_mixture`` DistiLLM-2's SRKL, whose mixture
    holds the student's probabilities detached."""
    teacher_probs, student_probs, mask, inf_mask = _distillm_terms(logits, teacher_logits, labels)
    in_mixture = student_probs.detach() if detach_mixture else student_probs
    mixed_logprobs = torch.log((1 - lam) * teacher_probs + lam * in_mixture)
    prod = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
    prod = prod - torch.masked_fill(student_probs * F.log_softmax(logits, -1), inf_mask, 0)
    return _masked_mean(prod.sum(-1).view(-1), mask)


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.9])
def test_distillm_conventions(lam):
    """``js_distance(lam)``: λ is the student's weight in the mixture, β = 1 − λ here.
    ``skewed_forward_kl(lam)``: λ is the teacher's weight, α = 1 − λ, and DistiLLM returns the
    cross-entropy −Σ p log m: our value plus the teacher's entropy, with the same gradient.
    ``skewed_reverse_kl(lam)``: α = λ, value and gradient."""
    student, teacher, labels = _problem(3)
    t64, valid = teacher.double(), labels != -100

    def check(ours_fn, peer_fn, offset=0.0):
        value, grad = _grad(ours_fn, student)
        peer_value, peer_grad = _grad(peer_fn, student)
        close(value + offset, peer_value)
        close(grad, peer_grad)

    def peer_js(x):
        return peer_distillm_js_distance(x, t64, labels, lam=lam)
    check(lambda x: ak.divergence_loss(x, teacher, labels, kind="jsd", beta=1 - lam), peer_js)
    if lam != 0.5:  # β = λ would be the other weighting
        assert not torch.allclose(ak.divergence_loss(student, teacher, labels, kind="jsd", beta=lam).double(),
                                  peer_distillm_js_distance(student.double(), t64, labels, lam=lam), rtol=1e-3)
    p = F.softmax(t64, -1)
    entropy = -(p * F.log_softmax(t64, -1)).sum(-1)[valid].mean()

    def peer_skl(x):
        return peer_distillm_skewed_forward_kl(x, t64, labels, lam=lam)
    check(lambda x: ak.divergence_loss(x, teacher, labels, kind="skl", alpha=1 - lam), peer_skl, offset=entropy)

    def peer_srkl(x):
        return peer_distillm_skewed_reverse_kl(x, t64, labels, lam=lam)
    check(lambda x: ak.divergence_loss(x, teacher, labels, kind="srkl", alpha=lam), peer_srkl)


def test_distillm2_detach_moves_much_of_the_srkl_gradient():
    """DistiLLM-2's SRKL detaches q inside the mixture: the same value, a different gradient. The
    part it drops — the gradient through q in m — is large: on these logits (student and teacher
    standard normal ×2, V = 11, λ = 0.1, DistiLLM-2's default) it is 49 % of the full gradient's
    norm (the README's figure; other seeds of this setting give 42–49 %)."""
    student, teacher, labels = _problem(4, B=4, T=16)
    t64 = teacher.double()
    value, grad = _grad(lambda x: ak.divergence_loss(x, teacher, labels, kind="srkl", alpha=0.1), student)

    def peer(x):
        return peer_distillm_skewed_reverse_kl(x, t64, labels, lam=0.1, detach_mixture=True)
    peer_value, peer_grad = _grad(peer, student)
    close(value, peer_value)
    moved = float((grad.double() - peer_grad).norm() / grad.double().norm())
    assert 0.48 < moved < 0.50, moved


# ---- MiniLLM: the returns of its policy gradient -------------------------------------------------

def peer_minillm_advantages(rewards, mask, gamma, use_whitening=True):
    """MiniLLM's ``Loss._get_advantages_and_returns``, transcribed: the γ-discounted sum of the
    rewards from t on, divided by the *undiscounted* number of valid positions from t on, then
    whitened (the default)."""
    rewards, mask = rewards.double(), mask.double()
    lens = torch.cumsum(mask, dim=-1)
    lens = mask - lens + lens[:, -1:None]
    lens = torch.masked_fill(lens, lens == 0, 1)
    last, reversed_rw = 0, []
    for t in reversed(range(rewards.shape[1])):
        last = rewards[:, t] + gamma * last
        reversed_rw.append(last)
    advantages = torch.stack(reversed_rw[::-1], dim=1) / lens
    if use_whitening:
        mean, var = advantages.mean(), advantages.var()
        advantages = (advantages - mean) * torch.rsqrt(var + 1e-8)
    return advantages


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_minillm_returns(gamma):
    """MiniLLM's reward is r_t = log p(y_t) − log q(y_t) = ℓ_t, and its policy-gradient factor the
    (length-normalised, whitened) return. On an SGO with α = 0 (reverse KL) our λ_t is that return
    **minus 1** (the score term E[∇log q] = 0 that MiniLLM leaves out), unwhitened, and
    ``length_normalize`` divides by the *discounted* count N_t = Σ γ^k, MiniLLM by the plain count:
    the two agree at γ = 1 only."""
    g = torch.Generator().manual_seed(6)
    B, T, V = 3, 8, 13
    student, teacher = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 5:] = -100                                        # a shorter response (padding at the end)
    labels[2, 6:] = -100
    mask = labels != -100
    _, stats = ak.askd_loss(student, labels, teacher, student_generated=True, alpha=0.0, gamma=gamma,
                            length_normalize=True, return_stats=True)
    lam = stats["lam"].double()
    rewards = torch.where(mask, stats["log_ratio"].double(), 0.0)
    minillm = peer_minillm_advantages(rewards, mask, gamma, use_whitening=False)
    # N_t / count_t turns MiniLLM's normalisation into ours
    count = mask.double().flip(1).cumsum(1).flip(1)
    discounted = torch.zeros_like(count)
    running = torch.zeros(B, dtype=torch.float64)
    for t in reversed(range(T)):
        running = torch.where(mask[:, t], 1 + gamma * running, running)
        discounted[:, t] = running
    close((lam + 1)[mask], (minillm * count / discounted)[mask])
    if gamma == 1.0:
        close((lam + 1)[mask], minillm[mask])
    else:
        assert not torch.allclose((lam + 1)[mask], minillm[mask], rtol=1e-3)
    # and MiniLLM whitens by default: its factor is not the unwhitened return
    assert not torch.allclose(peer_minillm_advantages(rewards, mask, gamma)[mask], minillm[mask], rtol=1e-2)


# ---- Hugging Face: the causal-LM loss shifts the labels inside ------------------------------------

def test_hf_causal_lm_shifts_labels_this_library_does_not():
    """``model(input_ids, labels=input_ids).loss`` is the token-mean NLL of ``logits[:, :-1]``
    against ``input_ids[:, 1:]``: HF shifts inside. Here ``logits[b, t]`` predicts ``labels[b, t]``,
    so pass the shifted pair. On a TGO with α = 1 ``askd_loss``'s gradient is exactly that NLL's
    gradient (the SFT gradient), and its ``log_q`` stat the per-token log-likelihood."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 10))
    ids_labels = ids.clone()
    ids_labels[1, :3] = -100                                  # a prompt, ignored by both
    out = model(ids, labels=ids_labels)
    logits = out.logits.detach().requires_grad_()
    hf = F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids_labels[:, 1:].reshape(-1))
    close(out.loss, hf)
    hf.backward()
    hf_grad = logits.grad.clone()

    logits.grad = None
    loss, stats = ak.askd_loss(logits[:, :-1], ids_labels[:, 1:], teacher_logprobs=torch.zeros(2, 9),
                               student_generated=False, alpha=1.0, return_stats=True)
    loss.backward()
    close(logits.grad, hf_grad)
    valid = ids_labels[:, 1:] != -100
    close(-stats["log_q"][valid].mean(), out.loss)
    # unshifted, the pairs are wrong
    assert not torch.allclose(F.cross_entropy(out.logits.reshape(-1, 64), ids_labels.reshape(-1)), out.loss,
                              rtol=1e-3)
