"""The TRL drop-in (``askd_kernels.integrations.trl``): TRL's ``generalized_jsd_loss`` cases through
the adapter, parity with TRL's own function, and TRL's ``GKDTrainer`` run for a few steps with the
loss routed through ``divergence_loss``: the same losses and updates, less peak memory. CPU."""
import os
import random

import pytest
import torch
import torch.nn.functional as F

from askd_kernels.integrations import trl as askd_trl
from askd_kernels.integrations.trl import generalized_jsd_loss

B, T, V = 2, 3, 5


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)


# ---- TRL's own unit tests of GKDTrainer.generalized_jsd_loss (TestGeneralizedJSDLoss), re-implemented ----
# The eight cases of TRL's test class, each asserting what TRL asserts of its own function, with
# the adapter in its place (TRL's setup draws unseeded randn; here the generator is seeded).

def test_trl_case_uniform_distribution():
    x = torch.ones(1, 1, V)
    assert round(abs(generalized_jsd_loss(x, x).item() - 0), 5) == 0


def test_trl_case_edge_cases():
    student = torch.log(torch.tensor([[0.1, 0.9]])).unsqueeze(0)
    teacher = torch.log(torch.tensor([[0.9, 0.1]])).unsqueeze(0)
    # beta = 1: KL(student || teacher); beta = 0: KL(teacher || student)
    expected_1 = F.kl_div(F.log_softmax(teacher, -1), F.softmax(student, -1), reduction="batchmean")
    assert round(abs(generalized_jsd_loss(student, teacher, beta=1).item() - expected_1.item()), 5) == 0
    expected_0 = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="batchmean")
    assert round(abs(generalized_jsd_loss(student, teacher, beta=0).item() - expected_0.item()), 5) == 0


def test_trl_case_output_shape(logits):
    loss = generalized_jsd_loss(*logits)
    assert torch.is_tensor(loss) and loss.shape == torch.Size([])


def test_trl_case_beta_values(logits):
    assert generalized_jsd_loss(*logits, beta=0) != generalized_jsd_loss(*logits, beta=1)


def test_trl_case_temperature_scaling(logits):
    assert generalized_jsd_loss(*logits, temperature=1) != generalized_jsd_loss(*logits, temperature=2)


def test_trl_case_reduction_methods(logits):
    s, t = logits
    for reduction in ("batchmean", "sum", "mean"):
        assert generalized_jsd_loss(s, t, reduction=reduction).shape == torch.Size([])
    # TRL's "none" is per element (the logits' shape without labels); "per_token" is this library's
    assert generalized_jsd_loss(s, t, reduction="none").shape == s.shape
    assert generalized_jsd_loss(s, t, reduction="per_token").shape == s.shape[:-1]


def test_trl_case_symmetry(logits):
    s, t = logits
    assert generalized_jsd_loss(s, t, beta=0.1) != generalized_jsd_loss(t, s, beta=0.1)
    assert generalized_jsd_loss(s, t, beta=0.5) == generalized_jsd_loss(t, s, beta=0.5)


def test_trl_case_zero_loss_for_identical_inputs():
    x = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1))
    assert round(abs(generalized_jsd_loss(x, x).item() - 0), 6) == 0


# ---- the adapter's own contract ---------------------------------------------------------------

def _trl_reference(s, t, labels=None, beta=0.5, temperature=1.0, reduction="batchmean", num_items_in_batch=None):
    """TRL's generalized_jsd_loss (trl 1.16, experimental/gkd/gkd_trainer.py), transcribed: F.kl_div
    terms over the stacked log-mixture, mask by labels, then the reduction."""
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta)
        mix = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mix, lt, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(mix, ls, reduction="none", log_target=True)
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        return jsd.sum() / (mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1))
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


CASES = [dict(), dict(beta=0.0), dict(beta=1.0), dict(beta=0.1), dict(beta=0.9, temperature=2.0),
         dict(reduction="sum"), dict(reduction="mean"), dict(reduction="none"), dict(num_items_in_batch=7),
         dict(reduction="none", num_items_in_batch=torch.tensor(11))]


@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_values_and_gradients_equal_trls_formula(case, with_labels):
    """Value and student gradient of the adapter = those of TRL's formula, per reduction, β, τ,
    num_items_in_batch, with and without labels; fp32 on 4 × 6 × 33 logits: 1e-6 absolute / 1e-5
    relative covers the summation-order differences of a 33-wide softmax and the token sums."""
    g = torch.Generator().manual_seed(2)
    s = (3 * torch.randn(4, 6, 33, generator=g)).requires_grad_()
    t = 3 * torch.randn(4, 6, 33, generator=g)
    labels = torch.randint(0, 33, (4, 6), generator=g)
    labels[:, :2] = -100
    labels[3] = -100
    lab = labels if with_labels else None
    ours = generalized_jsd_loss(s, t, lab, **case)
    ref = _trl_reference(s, t, lab, **case)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref.float(), atol=1e-6, rtol=1e-5)
    w = torch.randn(ref.shape, generator=g) if ref.ndim else torch.tensor(1.0)
    (g1,) = torch.autograd.grad((ours * w).sum(), s)
    (g2,) = torch.autograd.grad((ref * w).sum(), s)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_flat_inputs_and_empty_masks():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(10, 17, generator=g), torch.randn(10, 17, generator=g)      # GOLD-style [N, V]
    torch.testing.assert_close(generalized_jsd_loss(s, t), _trl_reference(s, t), atol=1e-6, rtol=1e-5)
    labels = torch.full((10,), -100)
    assert generalized_jsd_loss(s, t, labels).item() == 0.0                          # batchmean: 0 / 1
    assert torch.isnan(generalized_jsd_loss(s, t, labels, reduction="mean"))         # TRL: mean of nothing
    assert torch.isnan(_trl_reference(s, t, labels, reduction="mean"))
    # a 0-d tensor β is a number (TRL passes floats; users pass either)
    torch.testing.assert_close(generalized_jsd_loss(s, t, beta=torch.tensor(0.3)), generalized_jsd_loss(s, t, beta=0.3))


def test_bad_arguments_name_the_argument(logits):
    s, t = logits
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(s, t, reduction="average")
    with pytest.raises(ValueError, match="teacher_logits"):
        generalized_jsd_loss(s, t[:, :2])
    with pytest.raises(ValueError, match="labels"):
        generalized_jsd_loss(s, t, torch.zeros(B, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(s, t, beta=1.5)
    with pytest.raises(TypeError, match="beta"):
        generalized_jsd_loss(s, t, beta="0.5")
    with pytest.raises(TypeError, match="trainer"):
        askd_trl.use_askd_kernels(object)


def test_routing_falls_back_for_options_the_kernel_does_not_serve():
    calls = []

    class Fake:
        @staticmethod
        def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                                 reduction="batchmean", logits_are_probs=False, num_items_in_batch=None):
            calls.append(logits_are_probs)
            return torch.tensor(-1.0)

    cls = askd_trl.use_askd_kernels(Fake)
    assert cls.__name__ == "ASKDFake" and Fake.generalized_jsd_loss is not cls.generalized_jsd_loss
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    torch.testing.assert_close(cls.generalized_jsd_loss(s, t), generalized_jsd_loss(s, t))   # routed
    assert calls == []
    assert cls.generalized_jsd_loss(s.softmax(-1), s.softmax(-1), logits_are_probs=True).item() == -1  # original
    assert calls == [True]
    inst = askd_trl.use_askd_kernels(Fake())
    assert abs(inst.generalized_jsd_loss(s, s, reduction="sum").item()) < 1e-6     # routed: JSD(q, q) = 0
    hook = inst.generalized_jsd_loss
    assert (hook.routed_calls, hook.fallback_calls) == (1, 0)
    # patching twice wraps TRL's original once
    assert askd_trl.use_askd_kernels(inst).generalized_jsd_loss.askd_original is Fake.generalized_jsd_loss


# ---- TRL's GKDTrainer, a few steps on tiny random models ----------------------------------------

PAD, BOS, EOS = 0, 1, 2
TRL_V = 2048


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **{f"t{i}": i for i in range(4, TRL_V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def _model(seed, hidden, init):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=TRL_V, hidden_size=hidden, intermediate_size=2 * hidden,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                     max_position_embeddings=64, initializer_range=init,
                                     bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD))
    m.generation_config.pad_token_id, m.generation_config.eos_token_id = PAD, EOS
    return m


def _rows(n):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        prompt = torch.randint(4, TRL_V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        answer = torch.randint(4, TRL_V, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        rows.append({"prompt": [BOS] + prompt, "completion": answer + [EOS]})
    return rows


def _collate(features):
    """The batch GKDTrainer reads: full sequences with labels (prompt masked) and left-padded prompts."""
    P = max(len(f["prompt"]) for f in features)
    L = max(len(f["prompt"]) + len(f["completion"]) for f in features)
    out = {k: [] for k in ("input_ids", "attention_mask", "labels", "prompts", "prompt_attention_mask")}
    for f in features:
        p, c = f["prompt"], f["completion"]
        pad = L - len(p) - len(c)
        out["input_ids"].append(p + c + [PAD] * pad)
        out["attention_mask"].append([1] * (len(p) + len(c)) + [0] * pad)
        out["labels"].append([-100] * len(p) + c + [-100] * pad)
        out["prompts"].append([PAD] * (P - len(p)) + p)
        out["prompt_attention_mask"].append([0] * (P - len(p)) + [1] * len(p))
    return {k: torch.tensor(v) for k, v in out.items()}


def _train(cls, tmp_path):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig

    from bench.measure import cpu_allocations

    args = GKDConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1.0,
                     lmbda=0.5, beta=0.5, max_new_tokens=8, use_cpu=True, bf16=False, report_to=[],
                     save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)
    student = _model(0, 16, 0.02)
    # plain SGD: the update is linear in the gradient, so equal gradients give equal weights (Adam's
    # g / sqrt(v) would magnify float noise on near-zero gradients up to the learning rate)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    trainer = cls(model=student, teacher_model=_model(1, 32, 0.5), args=args, optimizers=(opt, None),
                  train_dataset=Dataset.from_list(_rows(16)), data_collator=_collate, processing_class=_tokenizer())
    _, peak, _ = cpu_allocations(trainer.train)
    if peak is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, peak, trainer


def test_gkd_trainer_same_loss_less_memory(tmp_path):
    """TRL's GKDTrainer (λ = 0.5: on-policy and dataset batches, seeded) for 3 steps, as TRL ships
    it and with ``use_askd_kernels``: the same logged losses and the same trained weights; the
    routed run's peak CPU allocation over the whole ``train()`` is at most half TRL's (measured:
    2.9 MB against 7.0 MB at V = 2048, losses equal to 1.2e-7 relative — TRL's loss holds about ten
    [B, T, V] fp32 tensors, ours none but the gradient). Ignoring ``num_items_in_batch`` in the
    adapter (a mutant) fails the loss comparison by 22 %."""
    pytest.importorskip("trl")
    pytest.importorskip("accelerate")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    random.seed(0)
    ref_losses, ref_peak, ref = _train(GKDTrainer, tmp_path / "trl")
    ours_losses, ours_peak, ours = _train(askd_trl.use_askd_kernels(GKDTrainer), tmp_path / "askd")
    hook = ours.generalized_jsd_loss
    assert hook.routed_calls == 3 and hook.fallback_calls == 0
    assert len(ref_losses) == len(ours_losses) == 3 and min(ref_losses) > 0.05     # a real divergence
    # fp32 sums over 2048-wide rows in another order, then two SGD steps: 1e-5 relative
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    for a, b in zip(ours.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours_peak <= 0.5 * ref_peak, (ours_peak, ref_peak)


def test_trl_trainers_with_the_hook():
    """ASKDGKDTrainer is built on first use; GOLD's and IW-OPD's hooks are routed when the kernel
    serves the call (same value as TRL's) and passed on otherwise; DistillationTrainer has no hook."""
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl import DistillationTrainer
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.gold import GOLDTrainer
    from trl.experimental.iw_opd import IWOPDTrainer

    cls = askd_trl.ASKDGKDTrainer
    assert issubclass(cls, GKDTrainer) and cls.generalized_jsd_loss.askd_original is GKDTrainer.generalized_jsd_loss
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 5, 9, generator=g), torch.randn(2, 5, 9, generator=g)
    for trl_cls, other in ((GOLDTrainer, dict(logits_are_probs=True)), (IWOPDTrainer, dict(top_k=3))):
        hook = askd_trl.use_askd_kernels(trl_cls).generalized_jsd_loss
        torch.testing.assert_close(hook(s, t, beta=0.3), trl_cls.generalized_jsd_loss(s, t, beta=0.3),
                                   atol=1e-6, rtol=1e-5)
        x, y = (s.softmax(-1), t.softmax(-1)) if "logits_are_probs" in other else (s, t)
        assert hook(x, y, **other) == trl_cls.generalized_jsd_loss(x, y, **other)
        assert (hook.routed_calls, hook.fallback_calls) == (1, 1)
    with pytest.raises(TypeError, match="DistillationTrainer"):
        askd_trl.use_askd_kernels(DistillationTrainer)
