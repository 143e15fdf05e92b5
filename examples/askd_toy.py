"""A reproducible toy run of ASKD (Algorithm 1) with ablations, on CPU, in minutes.

Task (verifiable, made in code): sort a list of K digits. Prompt ``BOS d1 … dK SEP``, answer the
sorted digits then ``EOS``. Reward: 1 for the exact answer, else 0.5 × the fraction of the K
answer positions that are right. Models: a teacher ``LlamaForCausalLM`` and a smaller student
``Qwen2ForCausalLM`` (same 16-token vocabulary), random weights, built from configs.

1. The teacher is trained with SFT on correct answers (fixed seed, once per run).
2. For each seed the student gets a short SFT warm-up on correct answers (so that its samples are
   sometimes right and rewards vary), then each variant distils the teacher into a copy of it:

   askd          ASKD: adaptive α = Φ(β r̂), κ clipping of correct SGOs, sampled-token estimator
   askd_ln       ASKD with length_normalize=True (G_t divided by the remaining tokens, as MiniLLM)
   no_adaptive   w/o adaptive skew (α = 0.5 on every TGO and SGO)
   no_clip       w/o clipping (κ = 1 everywhere)
   no_mc         w/o Monte-Carlo: full-vocabulary skl on TGOs / srkl on SGOs, adaptive α, κ
   distillm2     DistiLLM-2 style: full-vocabulary skl (α = 0.9) + srkl (α = 0.1), no clipping
   grpo          GRPO-style: fixed-α (0.5) sampled-token SKL/SRKL × the group-normalised reward r̂
   sft           SFT on teacher outputs (cross-entropy on TGOs only)

3. Held-out accuracy (greedy pass@1) of every variant, mean ± std over the seeds → a markdown
   table, a PNG bar plot, and the λ distributions of TGOs and SGOs of the ASKD runs (Fig. 1(b)).

    python -m examples.askd_toy            # the full table (3 seeds × 7 variants)
    python -m examples.askd_toy --quick    # a smaller run (fewer epochs, 2 seeds)

Outputs go to ``examples/results/`` (``--out``). Needs ``transformers``, ``matplotlib``, ``tqdm``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

PAD, BOS, EOS, SEP, DIGIT0 = 0, 1, 2, 3, 4
VOCAB = 16

VARIANTS = {
    "askd": dict(loss="askd"),
    "askd_ln": dict(loss="askd", length_normalize=True),
    "no_adaptive": dict(loss="askd", adaptive_skew=False, fixed_alpha_tgo=0.5, fixed_alpha_sgo=0.5),
    "no_clip": dict(loss="askd", clip_correct=False),
    "no_mc": dict(loss="full_vocab"),
    "distillm2": dict(loss="full_vocab", adaptive_skew=False, fixed_alpha_tgo=0.9, fixed_alpha_sgo=0.1,
                      clip_correct=False),
    "grpo": dict(loss="grpo", adaptive_skew=False, fixed_alpha_tgo=0.5, fixed_alpha_sgo=0.5, clip_correct=False),
    "sft": dict(loss="sft", use_student_outputs=False),
}
LABELS = {"askd": "ASKD (full)", "askd_ln": "ASKD + length-normalised G_t", "no_adaptive": "w/o adaptive skew (α=0.5)", "no_clip": "w/o clipping",
          "no_mc": "w/o Monte-Carlo (full-vocab skl/srkl)", "distillm2": "DistiLLM-2 style (skl α=.9 + srkl α=.1)",
          "grpo": "GRPO-style advantage × fixed-α SKL", "sft": "SFT on teacher outputs"}


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
    epochs: int = 40                # Algorithm 1 epochs per variant
    prompts_per_epoch: int = 16
    group_size: int = 4
    iterations: int = 2             # T
    micro_batch_size: int = 64
    lr: float = 1e-3
    beta: float = 1.0
    n_eval: int = 512
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


def sft(model, task: Task, steps: int, cfg: ToyConfig, desc: str, target: float | None = None):
    """Cross-entropy on correct answers (prompt positions ignored); stops early at ``target``."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True)
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


# -------------------------------------------------------------------------------- distillation ----

def distil(variant: str, student, teacher, task: Task, cfg: ToyConfig, seed: int, keep_lambda=False):
    from tqdm.auto import tqdm

    from askd_kernels.integrations.hf import ASKDConfig, ASKDDistiller

    torch.manual_seed(10_000 + seed)
    acfg = ASKDConfig(group_size=cfg.group_size, max_new_tokens=task.k + 1, iterations=cfg.iterations,
                      micro_batch_size=cfg.micro_batch_size, beta=cfg.beta, collect_lambda=keep_lambda,
                      **VARIANTS[variant])
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    runner = ASKDDistiller(student, teacher, opt, reward_fn, acfg, eos_token_id=EOS, pad_token_id=PAD)
    history = []
    bar = tqdm(range(cfg.epochs), desc=f"{variant} s{seed}", leave=False, dynamic_ncols=True)
    for _ in bar:
        stats = runner.epoch(make_prompts(task.sample(cfg.prompts_per_epoch)))
        history.append(stats)
        bar.set_postfix(loss=f"{stats['loss_mean']:.3f}", r_sgo=f"{stats.get('reward_sgo', float('nan')):.2f}")
    lam = {k: torch.cat(v).tolist() if v else [] for k, v in runner.lambdas.items()}
    return history, lam


# ------------------------------------------------------------------------------------- outputs ----

def mean_std(xs):
    t = torch.tensor(xs, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(xs) > 1 else 0.0)


def write_outputs(out_dir, cfg, results, meta, lambdas):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    suffix = "_quick" if meta["quick"] else ""
    rows = ["| variant | held-out accuracy (greedy pass@1), mean ± std | per seed | last-epoch SGO reward "
            f"| last-epoch SGO length (answer = {cfg.k + 1}) |", "|---|---|---|---|---|"]
    base_m, base_s = mean_std(meta["student_warmup_acc"])
    rows.append(f"| student after warm-up (start of every variant) | {base_m:.3f} ± {base_s:.3f} | "
                f"{', '.join(f'{a:.3f}' for a in meta['student_warmup_acc'])} | | |")
    rows.append(f"| teacher ({meta['teacher_params']:,} params) | {meta['teacher_acc']:.3f} | | | |")
    for v in VARIANTS:
        accs = [r["acc"] for r in results[v]]
        m, s = mean_std(accs)
        rs = [r["history"][-1].get("reward_sgo") for r in results[v]]
        rs_txt = "—" if rs[0] is None else f"{mean_std(rs)[0]:.3f}"
        ls = [r["history"][-1].get("length_sgo") for r in results[v]]
        ls_txt = "—" if ls[0] is None else f"{mean_std(ls)[0]:.2f}"
        rows.append(f"| {LABELS[v]} | {m:.3f} ± {s:.3f} | {', '.join(f'{a:.3f}' for a in accs)} | {rs_txt} "
                    f"| {ls_txt} |")
    table = "\n".join(rows)
    with open(os.path.join(out_dir, f"table{suffix}.md"), "w") as f:
        f.write(f"Command: `{meta['command']}`\n\n{table}\n\n"
                f"Seeds {list(cfg.seeds)}; student {meta['student_params']:,} params (Qwen2), teacher "
                f"{meta['teacher_params']:,} params (Llama); wall time {meta['wall_s']:.0f} s on "
                f"{meta['platform']} (torch {meta['torch']}, transformers {meta['transformers']}, "
                f"{cfg.threads} thread(s)).\n")
    lam_summary = {k: ({q: torch.quantile(torch.tensor(v[:1_000_000]), q).item() for q in (0.01, 0.1, 0.5, 0.9, 0.99)}
                       if v else {}) for k, v in lambdas.items()}
    with open(os.path.join(out_dir, f"results{suffix}.json"), "w") as f:
        json.dump({"config": asdict(cfg), "meta": meta, "lambda_quantiles": lam_summary, "results": results}, f,
                  indent=1)

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(VARIANTS)
    ms = [mean_std([r["acc"] for r in results[v]]) for v in names]
    ax.bar(range(len(names)), [m for m, _ in ms], yerr=[s for _, s in ms], capsize=4, color="tab:blue")
    ax.axhline(base_m, color="gray", ls="--", label="student after warm-up")
    ax.axhline(meta["teacher_acc"], color="tab:green", ls=":", label="teacher")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("held-out accuracy (greedy pass@1)")
    ax.set_title(f"Toy ASKD (sort {cfg.k} digits), mean ± std over {len(cfg.seeds)} seeds")
    ax.legend(loc="center left")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"accuracy{suffix}.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, color in ((axes[0], "tgo", "tab:orange"), (axes[1], "sgo", "tab:blue")):
        lam = torch.tensor(lambdas[key])
        if lam.numel():
            lo, hi = torch.quantile(lam[torch.randperm(lam.numel())[:100_000]], torch.tensor([0.005, 0.995])).tolist()
            ax.hist(lam.clamp(lo, hi).tolist(), bins=60, range=(lo, hi), color=color)
            ax.set_title(f"{key.upper()}: {lam.numel():,} tokens, median {lam.median().item():.3f}")
        ax.set_xlabel("λ_t (clamped to the 0.5–99.5% quantiles)")
        ax.set_yscale("log")
    axes[0].set_ylabel("tokens")
    fig.suptitle("λ_t of ASKD (estimator='exact') over training, all seeds; clipped SGOs excluded")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"lambda_hist{suffix}.png"), dpi=120)
    plt.close(fig)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller run: 2 seeds, fewer epochs")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--epochs", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick 0,1)")
    args = p.parse_args(argv)

    cfg = ToyConfig()
    if args.quick:
        cfg = replace(cfg, seeds=(0, 1), epochs=12, teacher_steps=1000, n_eval=256)
    if args.epochs:
        cfg = replace(cfg, epochs=args.epochs)
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(int(x) for x in args.seeds.split(",")))
    if args.threads:
        cfg = replace(cfg, threads=args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants: {sorted(unknown)}")
    torch.set_num_threads(cfg.threads)
    import transformers
    from tqdm.auto import tqdm

    transformers.logging.set_verbosity_error()
    t0 = time.time()
    task = Task(cfg.k, cfg.n_eval)

    teacher = build_model("teacher", cfg.teacher_seed)
    torch.manual_seed(cfg.teacher_seed)
    steps = sft(teacher, task, cfg.teacher_steps, cfg, "teacher SFT", target=cfg.teacher_target)
    teacher.eval().requires_grad_(False)
    t_acc = accuracy(teacher, task)
    print(f"teacher: {steps} SFT steps, held-out accuracy {t_acc:.3f} ({time.time() - t0:.0f} s)", flush=True)

    results = {v: [] for v in variants}
    warm_acc, lambdas = [], {"tgo": [], "sgo": []}
    for seed in cfg.seeds:
        student0 = build_model("student", seed)
        untrained = accuracy(student0, task)
        torch.manual_seed(seed)
        sft(student0, task, cfg.student_warmup_steps, cfg, f"student warm-up s{seed}")
        warm_acc.append(accuracy(student0, task))
        print(f"seed {seed}: untrained student {untrained:.3f}, after warm-up {warm_acc[-1]:.3f}", flush=True)
        for v in tqdm(variants, desc=f"variants s{seed}", dynamic_ncols=True):
            ts = time.time()
            student = copy.deepcopy(student0)
            history, lam = distil(v, student, teacher, task, cfg, seed, keep_lambda=(v == "askd"))
            acc = accuracy(student, task)
            results[v].append({"seed": seed, "acc": acc, "history": history, "seconds": time.time() - ts})
            for k in lambdas:
                lambdas[k].extend(lam.get(k, []))
            print(f"  {v:12s} seed {seed}: accuracy {acc:.3f}  ({time.time() - ts:.0f} s)", flush=True)

    meta = {"command": "python -m examples.askd_toy" + (" --quick" if args.quick else "")
            + ("" if args.variants == ",".join(VARIANTS) else f" --variants {args.variants}")
            + (f" --epochs {args.epochs}" if args.epochs else "") + (f" --seeds {args.seeds}" if args.seeds else ""),
            "quick": args.quick, "teacher_acc": t_acc, "teacher_sft_steps": steps,
            "teacher_params": n_params(teacher), "student_params": n_params(build_model("student", 0)),
            "student_warmup_acc": warm_acc, "wall_s": time.time() - t0, "platform": platform.platform(),
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    table = write_outputs(args.out, cfg, {v: results[v] for v in variants}, meta, lambdas) \
        if variants == list(VARIANTS) else write_outputs_subset(args.out, cfg, results, meta, lambdas)
    print(table)
    print(f"wall time {meta['wall_s']:.0f} s; outputs in {args.out}")


def write_outputs_subset(out_dir, cfg, results, meta, lambdas):
    """For ``--variants`` subsets: only the JSON (the table and plots need every variant)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results_subset.json"), "w") as f:
        json.dump({"config": asdict(cfg), "meta": meta, "results": results}, f, indent=1)
    return "\n".join(f"{v}: {mean_std([r['acc'] for r in rs])}" for v, rs in results.items())


if __name__ == "__main__":
    main()
