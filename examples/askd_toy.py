"""A reproducible toy run of ASKD (Algorithm 1) with ablations, on CPU.

Task (verifiable, made in code): sort a list of K digits. Prompt ``BOS d1 … dK SEP``, answer the
sorted digits then ``EOS``. Reward: 1 for the exact answer, else 0.5 × the fraction of the K
answer positions that are right. Models: a teacher ``LlamaForCausalLM`` and a smaller student
``Qwen2ForCausalLM`` (same 16-token vocabulary), random weights, built from configs.

1. The teacher is trained with SFT on correct answers (fixed seed; cached in ``build/toy-cache/``).
2. For each seed the student gets a short SFT warm-up on correct answers (so that its samples are
   sometimes right and rewards vary), then each variant distils the teacher into a copy of it, all
   with the same setting (:class:`ToyConfig`: rollout size, epochs, learning rate):

   askd           ASKD, the recipe: estimator="rao_blackwell", γ = 0.5, adaptive α = Φ(β r̂), κ
                  clipping of correct SGOs
   askd_gamma1    the same at the paper's γ = 1 (the whole undiscounted future return)
   no_mc          w/o Monte-Carlo: the same at γ = 0, i.e. the full-vocabulary skl/srkl of each token
                  (= loss="full_vocab"; tests/test_integration_hf.py checks the equality)
   no_adaptive    w/o adaptive skew (α = 0.5 on every TGO and SGO)
   no_clip        w/o clipping (κ = 1 everywhere)
   grpo           GRPO-style (paper Table 5): fixed-α (0.5) SKL/SRKL × the group-normalised reward r̂
   askd_sampled   ASKD with the sampled-token estimator (estimator="exact", the unbiased reading of
                  the paper's Eqs. 10–11)
   askd_baseline  ASKD + the leave-one-out baseline over the SGOs of a prompt (baseline=True)
   distillm2      DistiLLM-2 style: full-vocabulary skl (α = 0.9) + srkl (α = 0.1), no clipping
   sft            SFT on teacher outputs (cross-entropy on TGOs only)

3. Held-out accuracy (greedy pass@1) of every variant, mean ± std over the seeds → a markdown
   table, a JSON file (setting, per-epoch stats, accuracy curves, λ samples), a PNG of the final
   accuracies and the curves, and the λ distributions (the paper's Fig. 1(b)).

    python -m examples.askd_toy                          # 3 seeds × 10 variants (build/toy-results/)
    python -m examples.askd_toy --out examples/results   # the committed results
    python -m examples.askd_toy --quick                  # 2 seeds, a third of the epochs
    python -m examples.askd_toy --seeds 1 --out build/s1 # one seed; then combine runs with
    python -m examples.askd_toy --merge build/s0/results.json,build/s1/results.json --out DIR

Outputs go to ``build/toy-results/`` (untracked) unless ``--out``. Progress bars only when stderr is
a terminal. Needs ``transformers``, ``matplotlib``, ``tqdm``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

PAD, BOS, EOS, SEP, DIGIT0 = 0, 1, 2, 3, 4
VOCAB = 16

# The recipe: rao_blackwell with γ = 0.5 (the discount of the future return is the estimator's
# bias-variance knob; γ = 1 is the paper's undiscounted return, γ = 0 drops it). The ablations
# below change one thing of this recipe each.
RB = dict(loss="askd", estimator="rao_blackwell", gamma=0.5)
VARIANTS = {
    "askd": dict(RB),
    "askd_gamma1": dict(RB, gamma=1.0),
    "no_mc": dict(RB, gamma=0.0),
    "no_adaptive": dict(RB, adaptive_skew=False, fixed_alpha_tgo=0.5, fixed_alpha_sgo=0.5),
    "no_clip": dict(RB, clip_correct=False),
    "grpo": dict(RB, loss="grpo", adaptive_skew=False, fixed_alpha_tgo=0.5, fixed_alpha_sgo=0.5, clip_correct=False),
    "askd_sampled": dict(loss="askd", estimator="exact", gamma=1.0),
    "askd_baseline": dict(RB, baseline=True),
    "distillm2": dict(loss="full_vocab", adaptive_skew=False, fixed_alpha_tgo=0.9, fixed_alpha_sgo=0.1,
                      clip_correct=False),
    "sft": dict(loss="sft", use_student_outputs=False),
}
# not in the default table (``--variants``)
EXTRA_VARIANTS = {
    "askd_sampled_baseline": dict(loss="askd", estimator="exact", baseline=True, gamma=1.0),
    "askd_gamma08": dict(RB, gamma=0.8),   # γ between the recipe and the paper's

}
ALL_VARIANTS = {**VARIANTS, **EXTRA_VARIANTS}
LABELS = {"askd": "ASKD (rao_blackwell estimator, γ = 0.5, adaptive α, κ clipping)",
          "askd_gamma1": "ASKD at the paper's γ = 1 (undiscounted return)",
          "no_mc": "w/o Monte-Carlo (full-vocab skl/srkl per token, γ = 0)",
          "no_adaptive": "w/o adaptive skew (α = 0.5)",
          "no_clip": "w/o clipping (κ = 1)",
          "grpo": "GRPO-style advantage × fixed-α SKL/SRKL",
          "askd_sampled": "ASKD sampled-token (paper's estimator, `exact`)",
          "distillm2": "DistiLLM-2 style (skl α=.9 + srkl α=.1, full vocab)",
          "sft": "SFT on teacher outputs",
          "askd_baseline": "ASKD + leave-one-out baseline",
          "askd_sampled_baseline": "ASKD sampled-token + leave-one-out baseline",
          "askd_gamma08": "ASKD, γ = 0.8"}
LAMBDA_VARIANTS = ("askd_gamma1", "askd_sampled")  # their per-token λ go into lambda_hist.png (the paper's γ = 1)


@dataclass
class ToyConfig:
    k: int = 5                      # digits per list
    seeds: tuple = (0, 1, 2)
    teacher_seed: int = 1234
    teacher_steps: int = 1500       # SFT steps (stops early at teacher_target accuracy)
    teacher_target: float = 0.97
    student_warmup_steps: int = 40
    sft_batch: int = 128
    sft_lr: float = 3e-3
    # one shared setting for every variant (chosen by the sweep in docs/integration.md)
    epochs: int = 60                # Algorithm 1 epochs per variant
    prompts_per_epoch: int = 64
    group_size: int = 8             # responses per prompt and source: rollout = 64 × 8 TGOs + 64 × 8 SGOs
    iterations: int = 2             # T
    micro_batch_size: Optional[int] = None   # None: one optimisation step per pass over the rollout
    lr: float = 3e-4                # AdamW, constant
    beta: float = 1.0
    log_grad_split: bool = True     # the TGO/SGO gradient split of every step (one more backward)
    n_eval: int = 512
    eval_points: int = 6            # held-out accuracy at this many points during each run (curves)
    threads: int = 1


# ---------------------------------------------------------------------------------------- task ----

def make_prompts(lists: torch.Tensor) -> torch.Tensor:
    n = lists.shape[0]
    return torch.cat([torch.full((n, 1), BOS), lists + DIGIT0, torch.full((n, 1), SEP)], dim=1)


def answers(lists: torch.Tensor) -> torch.Tensor:
    return torch.cat([lists.sort(dim=1).values + DIGIT0, torch.full((lists.shape[0], 1), EOS)], dim=1)


def prompt_lists(prompts):
    return [[t - DIGIT0 for t in p[1:-1]] for p in prompts]


def reward_fn(prompts, responses):
    """1 for the sorted list, else 0.5 × fraction of the K positions right (responses: no EOS)."""
    out = []
    for p, r in zip(prompts, responses):
        target = sorted(t - DIGIT0 for t in p[1:-1])
        got = [t - DIGIT0 for t in r]
        if got == target:
            out.append(1.0)
        else:
            out.append(0.5 * sum(a == b for a, b in zip(got, target)) / len(target))
    return out


class Task:
    """Held-out lists are fixed; training lists are drawn from the rest."""

    def __init__(self, k: int, n_eval: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.k = k
        self.eval_lists = torch.randint(0, 10, (n_eval, k), generator=g)
        self._held = {tuple(x) for x in self.eval_lists.tolist()}

    def sample(self, n: int) -> torch.Tensor:
        out = []
        while len(out) < n:
            for x in torch.randint(0, 10, (2 * n, self.k)).tolist():
                if tuple(x) not in self._held:
                    out.append(x)
        return torch.tensor(out[:n])


# -------------------------------------------------------------------------------------- models ----

def build_model(kind: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=BOS, eos_token_id=EOS,
                  pad_token_id=PAD, tie_word_embeddings=False)
    if kind == "teacher":
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=4, **common)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, **common)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def accuracy(model, task: Task) -> float:
    """Greedy pass@1 on the held-out lists."""
    from transformers import GenerationConfig

    prompts = make_prompts(task.eval_lists)
    model.eval()
    seqs = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                          generation_config=GenerationConfig(do_sample=False, max_new_tokens=task.k + 1,
                                                             eos_token_id=EOS, pad_token_id=PAD))
    model.train()
    want = answers(task.eval_lists)
    got = F.pad(seqs[:, prompts.shape[1]:], (0, want.shape[1]), value=PAD)[:, :want.shape[1]]
    return (got == want).all(dim=1).float().mean().item()


def progress(iterable, **kw):
    """tqdm only when stderr is a terminal (no bars in logs and CI)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not sys.stderr.isatty(), leave=False, dynamic_ncols=True, **kw)


def sft(model, task: Task, steps: int, cfg: ToyConfig, desc: str, target: float | None = None):
    """Cross-entropy on correct answers (prompt positions ignored); stops early at ``target``."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    bar = progress(range(steps), desc=desc)
    acc = None
    for step in bar:
        lists = task.sample(cfg.sft_batch)
        prompts, ans = make_prompts(lists), answers(lists)
        ids = torch.cat([prompts, ans], dim=1)
        labels = torch.cat([torch.full_like(prompts, -100), ans], dim=1)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if target is not None and (step + 1) % 250 == 0:
            acc = accuracy(model, task)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
            if acc >= target:
                break
    return step + 1


def teacher_model(task: Task, cfg: ToyConfig, cache_dir: str | None):
    """The SFT-trained teacher, from ``cache_dir`` when a run with the same settings saved it."""
    key = hashlib.sha256(json.dumps([cfg.k, cfg.n_eval, cfg.teacher_seed, cfg.teacher_steps, cfg.teacher_target,
                                     cfg.sft_batch, cfg.sft_lr, torch.__version__]).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"teacher-{key}.pt") if cache_dir else None
    teacher = build_model("teacher", cfg.teacher_seed)
    if path and os.path.exists(path):
        saved = torch.load(path)
        teacher.load_state_dict(saved["state_dict"])
        steps = saved["steps"]
    else:
        torch.manual_seed(cfg.teacher_seed)
        steps = sft(teacher, task, cfg.teacher_steps, cfg, "teacher SFT", target=cfg.teacher_target)
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            torch.save({"state_dict": teacher.state_dict(), "steps": steps}, path)
    return teacher.eval().requires_grad_(False), steps


def warm_student(task: Task, cfg: ToyConfig, seed: int):
    """The seed's student after the SFT warm-up (the start of every variant)."""
    student = build_model("student", seed)
    torch.manual_seed(seed)
    sft(student, task, cfg.student_warmup_steps, cfg, f"student warm-up s{seed}")
    return student


def askd_config(variant: str, cfg: ToyConfig, task: Task, **extra):
    from askd_kernels.integrations.hf import ASKDConfig

    return ASKDConfig(group_size=cfg.group_size, max_new_tokens=task.k + 1, iterations=cfg.iterations,
                      micro_batch_size=cfg.micro_batch_size, beta=cfg.beta, **{**ALL_VARIANTS[variant], **extra})


# -------------------------------------------------------------------------------- distillation ----

def distil(variant: str, student, teacher, task: Task, cfg: ToyConfig, seed: int, keep_lambda=False):
    import warnings

    from askd_kernels.integrations.hf import ASKDDistiller, GradientSplitWarning

    torch.manual_seed(10_000 + seed)
    acfg = askd_config(variant, cfg, task, collect_lambda=keep_lambda,
                       log_grad_split=cfg.log_grad_split and variant != "sft")
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    runner = ASKDDistiller(student, teacher, opt, reward_fn, acfg, eos_token_id=EOS, pad_token_id=PAD)
    history, curve = [], [(0, accuracy(student, task))]
    every = max(1, cfg.epochs // max(1, cfg.eval_points))
    bar = progress(range(cfg.epochs), desc=f"{variant} s{seed}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradientSplitWarning)
        for e in bar:
            stats = runner.epoch(make_prompts(task.sample(cfg.prompts_per_epoch)))
            history.append(stats)
            if (e + 1) % every == 0 and e + 1 < cfg.epochs:
                curve.append((e + 1, accuracy(student, task)))
            bar.set_postfix(loss=f"{stats['loss_mean']:.3f}", r_sgo=f"{stats.get('reward_sgo', float('nan')):.2f}")
    warned = [str(w.message) for w in caught if issubclass(w.category, GradientSplitWarning)]
    lam = {k: torch.cat(v).tolist() if v else [] for k, v in runner.lambdas.items()}
    return history, curve, lam, warned


# ------------------------------------------------------------------------------------- outputs ----

def mean_std(xs):
    t = torch.tensor([x for x in xs if x is not None and x == x], dtype=torch.float64)
    if not t.numel():
        return float("nan"), float("nan")
    return t.mean().item(), (t.std().item() if t.numel() > 1 else 0.0)


def tail_mean(history, key, frac=0.25):
    """Mean of ``key`` over the last ``frac`` of the epochs (the split numbers are noisy per epoch)."""
    xs = [h[key] for h in history[-max(1, int(len(history) * frac)):] if key in h and h[key] == h[key]]
    return sum(xs) / len(xs) if xs else None


def fmt(x, spec=".2f"):
    return "—" if x is None or x != x else format(x, spec)


def table_rows(cfg, results, meta, variants):
    rows = ["| variant | held-out accuracy, mean ± std | per seed | SGO reward (last epoch) "
            f"| SGO length (answer = {cfg.k + 1}) | ‖∇SGO‖/‖∇TGO‖ | cos(∇TGO, ∇SGO) | TGO share of the step |",
            "|---|---|---|---|---|---|---|---|"]
    base_m, base_s = mean_std(meta["student_warmup_acc"])
    rows.append(f"| student after warm-up (start of every variant) | {base_m:.3f} ± {base_s:.3f} | "
                f"{', '.join(f'{a:.3f}' for a in meta['student_warmup_acc'])} | | | | | |")
    rows.append(f"| teacher ({meta['teacher_params']:,} params) | {meta['teacher_acc']:.3f} | | | | | | |")
    for v in variants:
        rs = results[v]
        m, s = mean_std([r["acc"] for r in rs])
        last = [r["history"][-1] for r in rs]
        cells = [mean_std([h.get("reward_sgo") for h in last])[0], mean_std([h.get("length_sgo") for h in last])[0]]
        cells += [mean_std([tail_mean(r["history"], k) for r in rs])[0]
                  for k in ("grad_ratio_sgo_tgo", "grad_cos_tgo_sgo", "grad_tgo_share")]
        per_seed = ", ".join(f"{r['acc']:.3f}" for r in rs)
        rows.append(f"| {LABELS[v]} | {m:.3f} ± {s:.3f} | {per_seed} | "
                    f"{fmt(cells[0], '.3f')} | {fmt(cells[1])} | {fmt(cells[2])} | {fmt(cells[3])} | {fmt(cells[4])} |")
    return rows


def _columns(history):
    """Per-epoch stats as ``{key: [value per epoch]}`` (None where an epoch lacks the key)."""
    keys = list(dict.fromkeys(k for h in history for k in h))
    return {k: [h.get(k) for h in history] for k in keys}


def _rows(columns):
    """The inverse of :func:`_columns`."""
    n = len(next(iter(columns.values()))) if columns else 0
    return [{k: v[i] for k, v in columns.items() if v[i] is not None} for i in range(n)]


def _rounded(x, digits=5):
    """Floats to ``digits`` significant digits (the JSON stays small); NaN and inf as they are."""
    if isinstance(x, float):
        return x if (x != x or x in (float("inf"), float("-inf")) or x == 0) else float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    return x


def write_outputs(out_dir, cfg, results, meta, lambdas, variants):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    suffix = meta["suffix"]
    table = "\n".join(table_rows(cfg, results, meta, variants))
    rollout = cfg.prompts_per_epoch * cfg.group_size
    with open(os.path.join(out_dir, f"table{suffix}.md"), "w") as f:
        f.write(f"Command: `{meta['command']}`\n\n{table}\n\n"
                f"Held-out accuracy: greedy pass@1 on {cfg.n_eval} held-out lists after the last epoch. The last "
                "three columns are the means over the last quarter of the epochs of the per-epoch stats "
                "`grad_ratio_sgo_tgo`, `grad_cos_tgo_sgo`, `grad_tgo_share` (`log_grad_split=True`; "
                "docs/integration.md).\n\n"
                f"Setting (every variant): {cfg.epochs} epochs × {cfg.prompts_per_epoch} prompts × {cfg.group_size} "
                f"responses per source ({rollout} TGOs + {rollout} SGOs per epoch), T = {cfg.iterations}, "
                + ("one optimisation step per pass over the rollout" if cfg.micro_batch_size is None
                   else f"micro-batches of {cfg.micro_batch_size}")
                + f", AdamW lr {cfg.lr:g} (constant), gradient clipping at 1, "
                f"β = {cfg.beta:g}. Seeds {list(cfg.seeds)}; student {meta['student_params']:,} params (Qwen2), teacher "
                f"{meta['teacher_params']:,} params (Llama); wall time {meta['wall_s']:.0f} s"
                + (f" (the sum of {len(meta['merged_from'])} runs merged with --merge)" if meta.get("merged_from") else "")
                + f" on "
                f"{meta['platform']} (torch {meta['torch']}, transformers {meta['transformers']}, "
                f"{cfg.threads} thread(s)).\n")
    lam_summary = {k: ({q: torch.quantile(torch.tensor(v[:1_000_000]), q).item() for q in (0.01, 0.1, 0.5, 0.9, 0.99)}
                       if v else {}) for k, v in lambdas.items()}
    g = torch.Generator().manual_seed(0)
    lam_sample = {k: [round(x, 3) for x in torch.tensor(v)[torch.randperm(len(v), generator=g)[:3_000]].tolist()]
                  for k, v in lambdas.items() if v}
    with open(os.path.join(out_dir, f"results{suffix}.json"), "w") as f:
        columns = {v: [{**r, "history": _columns(r["history"])} for r in rs] for v, rs in results.items()}
        json.dump(_rounded({"config": asdict(cfg), "meta": meta, "lambda_quantiles": lam_summary, "results": columns,
                            "lambdas": lam_sample}, 6), f, separators=(",", ":"))
        f.write("\n")

    base_m = mean_std(meta["student_warmup_acc"])[0]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [1.1, 1]})
    ax = axes[0]
    ms = [mean_std([r["acc"] for r in results[v]]) for v in variants]
    ax.bar(range(len(variants)), [m for m, _ in ms], yerr=[s for _, s in ms], capsize=4, color="tab:blue")
    ax.axhline(base_m, color="gray", ls="--", label="student after warm-up")
    ax.axhline(meta["teacher_acc"], color="tab:green", ls=":", label="teacher")
    ax.set_xticks(range(len(variants)), variants, rotation=25, ha="right")
    ax.set_ylabel("held-out accuracy (greedy pass@1)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"after {cfg.epochs} epochs, mean ± std over {len(cfg.seeds)} seeds")
    ax.legend(loc="lower left", fontsize=8)
    ax = axes[1]
    for v in variants:
        xs = [e for e, _ in results[v][0]["curve"]] + [cfg.epochs]
        ys = torch.tensor([[a for _, a in r["curve"]] + [r["acc"]] for r in results[v]]).mean(0)
        ax.plot(xs, ys.tolist(), marker="o", ms=3, label=v)
    ax.axhline(meta["teacher_acc"], color="tab:green", ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy (mean over seeds)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title("during distillation")
    fig.suptitle(f"Toy ASKD: sort {cfg.k} digits ({cfg.prompts_per_epoch}×{cfg.group_size} responses per source "
                 f"per epoch, lr {cfg.lr:g})")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"accuracy{suffix}.png"), dpi=110)
    plt.close(fig)

    panels = [(k, v) for k, v in lambdas.items() if v and any(x != 0 for x in v)]   # rao_blackwell TGO λ ≡ 0
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (key, lam) in zip(axes[0], panels):
            lam = torch.tensor(lam)
            lo, hi = torch.quantile(lam[torch.randperm(lam.numel())[:100_000]], torch.tensor([0.005, 0.995])).tolist()
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            ax.hist(lam.clamp(lo, hi).tolist(), bins=60, range=(lo, hi), color="tab:blue")
            ax.set_title(f"{key}: {lam.numel():,} tokens, median {lam.median().item():.3f}", fontsize=9)
            ax.set_xlabel("λ_t (clamped to the 0.5–99.5 % quantiles)")
            ax.set_yscale("log")
        axes[0][0].set_ylabel("tokens")
        fig.suptitle("λ_t over training, all seeds, clipped SGOs excluded: askd_sampled = estimator 'exact' "
                     "(TGO ρ_t, SGO G_t + ρ_t − 1); askd = 'rao_blackwell' (SGO: the future return F_t; TGO: 0)",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"lambda_hist{suffix}.png"), dpi=110)
        plt.close(fig)
    return table


def merge(paths, out_dir):
    """Combine runs of one setting (different seeds, or different variants) into one set of outputs."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    setting = {k: v for k, v in runs[0]["config"].items() if k not in ("seeds", "threads")}
    for run in runs[1:]:
        other = {k: v for k, v in run["config"].items() if k not in ("seeds", "threads")}
        if other != setting or run["meta"]["teacher_acc"] != runs[0]["meta"]["teacher_acc"]:
            raise SystemExit(f"cannot merge runs with different settings: {setting} vs {other}")
    results, warm, lambdas = {}, {}, {}
    for run in runs:
        for v, rs in run["results"].items():
            for r in rs:
                if isinstance(r["history"], dict):
                    r = {**r, "history": _rows(r["history"])}
                results.setdefault(v, {})[r["seed"]] = r
        for seed, acc in zip(run["config"]["seeds"], run["meta"]["student_warmup_acc"]):
            warm[seed] = acc
        for k, xs in run.get("lambdas", {}).items():
            lambdas.setdefault(k, []).extend(xs)
    seeds = sorted(warm)
    variants = [v for v in ALL_VARIANTS if v in results]
    missing = [(v, s) for v in variants for s in seeds if s not in results[v]]
    if missing:
        raise SystemExit(f"missing runs (variant, seed): {missing}")
    cfg = ToyConfig(**{**runs[0]["config"], "seeds": tuple(seeds)})
    meta = dict(runs[0]["meta"])
    meta.update(student_warmup_acc=[warm[s] for s in seeds], wall_s=sum(r["meta"]["wall_s"] for r in runs),
                suffix="" if variants == list(VARIANTS) else "_subset",
                command=" ".join(_without_flag(meta["command"].split(), "--seeds")
                                 + ([] if seeds == [0, 1, 2] else ["--seeds", ",".join(map(str, seeds))])),
                merged_from=[r["meta"]["command"] for r in runs])
    table = write_outputs(out_dir, cfg, {v: [results[v][s] for s in seeds] for v in variants}, meta, lambdas, variants)
    print(table)
    print(f"merged {len(runs)} runs (their wall times add up to {meta['wall_s']:.0f} s); outputs in {out_dir}")


def _without_flag(tokens, flag):
    return [t for i, t in enumerate(tokens) if t != flag and not (i and tokens[i - 1] == flag)]


def default_out():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "toy-results")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller run: 2 seeds, a third of the epochs")
    p.add_argument("--out", default=default_out(),
                   help="output folder (default build/toy-results/, untracked; examples/results holds the committed run)")
    p.add_argument("--cache", default=os.path.join(os.path.dirname(default_out()), "toy-cache"),
                   help="folder for the trained teacher ('' = no cache)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(ALL_VARIANTS)}")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick 0,1)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--prompts-per-epoch", type=int)
    p.add_argument("--group-size", type=int)
    p.add_argument("--micro-batch-size", type=int, help="rows per optimisation step (0 = the whole rollout)")
    p.add_argument("--iterations", type=int)
    p.add_argument("--no-grad-split", action="store_true", help="do not log the TGO/SGO gradient split")
    p.add_argument("--threads", type=int)
    p.add_argument("--merge", help="comma-separated results JSON files of runs with the same setting (e.g. one "
                                   "per seed): write the combined outputs to --out and exit")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge.split(","), args.out)

    cfg = ToyConfig()
    if args.quick:
        cfg = replace(cfg, seeds=(0, 1), epochs=max(1, cfg.epochs // 3), n_eval=256, eval_points=3)
    for name in ("epochs", "lr", "prompts_per_epoch", "group_size", "micro_batch_size", "iterations", "threads"):
        if getattr(args, name) is not None:
            cfg = replace(cfg, **{name: getattr(args, name) or None})
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(int(x) for x in args.seeds.split(",")))
    if args.no_grad_split:
        cfg = replace(cfg, log_grad_split=False)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        p.error(f"unknown variants: {sorted(unknown)}")
    torch.set_num_threads(cfg.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.time()
    task = Task(cfg.k, cfg.n_eval)
    teacher, steps = teacher_model(task, cfg, args.cache or None)
    t_acc = accuracy(teacher, task)
    print(f"teacher: {steps} SFT steps, held-out accuracy {t_acc:.3f} ({time.time() - t0:.0f} s)", flush=True)

    results = {v: [] for v in variants}
    warm_acc, lambdas = [], {}
    for seed in cfg.seeds:
        untrained = accuracy(build_model("student", seed), task)
        student0 = warm_student(task, cfg, seed)
        warm_acc.append(accuracy(student0, task))
        print(f"seed {seed}: untrained student {untrained:.3f}, after warm-up {warm_acc[-1]:.3f}", flush=True)
        for v in progress(variants, desc=f"variants s{seed}"):
            ts = time.time()
            student = copy.deepcopy(student0)
            history, curve, lam, warned = distil(v, student, teacher, task, cfg, seed,
                                                 keep_lambda=v in LAMBDA_VARIANTS)
            acc = accuracy(student, task)
            results[v].append({"seed": seed, "acc": acc, "curve": curve, "history": history,
                               "grad_split_warning": warned[0] if warned else None, "seconds": time.time() - ts})
            for k, x in lam.items():
                lambdas.setdefault(f"{v} {k.upper()}", []).extend(x)
            print(f"  {v:22s} seed {seed}: accuracy {acc:.3f}  ({time.time() - ts:.0f} s)"
                  + ("  [gradient-split warning]" if warned else ""), flush=True)

    flags = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--out")
                     and a != os.path.abspath(args.out) and a != args.out)
    suffix = "_quick" if args.quick else ("" if variants == list(VARIANTS) else "_subset")
    meta = {"command": ("python -m examples.askd_toy " + flags).strip(), "suffix": suffix, "quick": args.quick,
            "teacher_acc": t_acc, "teacher_sft_steps": steps, "teacher_params": n_params(teacher),
            "student_params": n_params(build_model("student", 0)), "student_warmup_acc": warm_acc,
            "wall_s": time.time() - t0, "platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "transformers": transformers.__version__}
    table = write_outputs(args.out, cfg, results, meta, lambdas, variants)
    print(table)
    print(f"wall time {meta['wall_s']:.0f} s; outputs in {args.out}")


if __name__ == "__main__":
    main()
