"""Gradient signal-to-noise ratio of the ASKD estimators on the toy's warm-up student.

For one student (the toy's seed-0 student after its SFT warm-up, :mod:`examples.askd_toy`) and the
toy's teacher, draw ``--batches`` independent rollouts (``prompts × group_size`` TGOs and as many
SGOs, sampled, scored, α and κ assigned as in Algorithm 1) and, on each, take the parameter gradient
of the TGO part and of the SGO part of the loss (:func:`compute_askd_loss_parts`, one gradient over
the whole rollout) for every estimator — on the same rollouts, so the estimators are paired. Per part
and for the total:

    SNR = ‖mean g‖ / sqrt(mean ‖g − mean g‖²)

(over the batches; ``mean g`` is the estimate of the expected gradient), the mean per-batch ratio
‖g_SGO‖ / ‖g_TGO‖ and cosine cos(g_TGO, g_SGO), and the cosine of each estimator's mean total
gradient with that of ``rao_blackwell`` (``exact`` and ``rao_blackwell`` have the same expectation,
so this tends to 1 as the batches grow; the full-vocabulary loss has another). Writes a markdown
table (``grad_snr.md``) and the numbers (``grad_snr.json``).

    python -m examples.grad_snr                        # 40 batches at 16×4 and 32×8, ~2 min on 1 thread
    python -m examples.grad_snr --out examples/results # the committed table
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from .askd_toy import (EOS, PAD, Task, ToyConfig, accuracy, default_out, make_prompts, progress, reward_fn,
                       teacher_model, warm_student)

ESTIMATORS = {
    "exact": dict(estimator="exact", gamma=1.0),
    "exact + baseline": dict(estimator="exact", baseline=True, gamma=1.0),
    "rao_blackwell": dict(estimator="rao_blackwell", gamma=1.0),
    "rao_blackwell + baseline": dict(estimator="rao_blackwell", baseline=True, gamma=1.0),
    "rao_blackwell γ = 0.5 (the recipe)": dict(estimator="rao_blackwell", gamma=0.5),
    "full-vocab (rao_blackwell γ = 0)": dict(estimator="rao_blackwell", gamma=0.0),
}


class Moments:
    """Running Σg and Σ‖g‖² of flattened gradients."""

    def __init__(self):
        self.n, self.sum, self.sq = 0, None, 0.0

    def add(self, g):
        g = g.double()
        self.n += 1
        self.sum = g.clone() if self.sum is None else self.sum + g
        self.sq += float(g @ g)

    def mean(self):
        return self.sum / self.n

    def snr(self):
        """‖mean g‖ / sqrt(mean ‖g − mean g‖²), as measured."""
        m = self.mean()
        signal = float(m.norm())
        noise = math.sqrt(max(self.sq / self.n - signal ** 2, 0.0))
        return signal / noise if noise > 0 else float("inf")

    def snr_debiased(self):
        """‖E g‖ / sqrt(tr Cov g), both estimated without bias: ‖mean g‖² − tr Ĉov/n and the n − 1
        variance. The measured SNR cannot fall below about 1/sqrt(n) (the noise left in the mean)."""
        m2 = float(self.mean().norm()) ** 2
        var = (self.sq / self.n - m2) * self.n / (self.n - 1)
        return math.sqrt(max(m2 - var / self.n, 0.0) / var) if var > 0 else float("inf")


def flat_grad(loss, params, retain_graph=False):
    if loss is None:
        return torch.zeros(sum(p.numel() for p in params))
    g = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
    return torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for p, x in zip(params, g)])


def measure(student, teacher, task, cfg: ToyConfig, prompts: int, group: int, batches: int, seed: int):
    from askd_kernels.integrations.hf import ASKDConfig, ASKDDistiller, compute_askd_loss_parts

    sampler = ASKDDistiller(student, teacher, None, reward_fn,
                            ASKDConfig(group_size=group, max_new_tokens=task.k + 1, beta=cfg.beta),
                            eos_token_id=EOS, pad_token_id=PAD)
    params = [p for p in student.parameters() if p.requires_grad]
    stats = {name: {"tgo": Moments(), "sgo": Moments(), "total": Moments(), "ratio": [], "cos": []}
             for name in ESTIMATORS}
    student.train()
    for i in progress(range(batches), desc=f"{prompts}x{group}"):
        torch.manual_seed(100_000 * seed + i)
        batch = sampler.sample(make_prompts(task.sample(prompts))).batch()
        for name, kw in ESTIMATORS.items():
            config = ASKDConfig(group_size=group, max_new_tokens=task.k + 1, beta=cfg.beta, **kw)
            loss_tgo, loss_sgo = compute_askd_loss_parts(student, batch, teacher=teacher, config=config)
            g_t = flat_grad(loss_tgo, params, retain_graph=loss_sgo is not None)
            g_s = flat_grad(loss_sgo, params)
            st = stats[name]
            st["tgo"].add(g_t)
            st["sgo"].add(g_s)
            st["total"].add(g_t + g_s)
            st["ratio"].append(float(g_s.norm() / g_t.norm()))
            st["cos"].append(float(g_t @ g_s / (g_t.norm() * g_s.norm())))
    ref = stats["rao_blackwell"]["total"].mean()
    rows = {}
    for name, st in stats.items():
        m = st["total"].mean()
        rows[name] = {"snr_tgo": st["tgo"].snr(), "snr_sgo": st["sgo"].snr(), "snr_total": st["total"].snr(),
                      "snr_debiased_tgo": st["tgo"].snr_debiased(), "snr_debiased_sgo": st["sgo"].snr_debiased(),
                      "snr_debiased_total": st["total"].snr_debiased(),
                      "ratio_sgo_tgo": sum(st["ratio"]) / batches, "cos_tgo_sgo": sum(st["cos"]) / batches,
                      "cos_mean_with_rao_blackwell": float(m @ ref / (m.norm() * ref.norm())),
                      "norm_mean_total": float(m.norm())}
    return rows


def main(argv=None):
    cfg = ToyConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--sizes", default=f"16x4,{cfg.prompts_per_epoch}x{cfg.group_size}",
                   help="comma-separated prompts×group_size rollout sizes (responses per source)")
    p.add_argument("--seed", type=int, default=0, help="the toy seed whose warm-up student is measured")
    p.add_argument("--out", default=default_out())
    p.add_argument("--cache", default=os.path.join(os.path.dirname(default_out()), "toy-cache"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.time()
    task = Task(cfg.k, cfg.n_eval)
    teacher, _ = teacher_model(task, cfg, args.cache or None)
    student = warm_student(task, cfg, args.seed)
    warm_acc = accuracy(student, task)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",") if s]
    results = {}
    for prompts, group in sizes:
        results[f"{prompts}x{group}"] = measure(student, teacher, task, cfg, prompts, group, args.batches, args.seed)
        print(f"{prompts}x{group} done ({time.time() - t0:.0f} s)", flush=True)

    argv = sys.argv[1:] if argv is None else argv
    flags = [a for i, a in enumerate(argv) if not (a.startswith("--out") or (i and argv[i - 1] == "--out"))]
    lines = [f"Command: `{' '.join(['python -m examples.grad_snr'] + flags)}`", ""]
    for size, rows in results.items():
        prompts, group = size.split("x")
        lines += [f"**Rollout {prompts} prompts × {group} responses per source** ({int(prompts) * int(group)} TGOs + "
                  f"{int(prompts) * int(group)} SGOs per gradient), {args.batches} independent rollouts:", "",
                  "| estimator | SNR TGO part | SNR SGO part | SNR total | debiased SNR TGO / SGO / total "
                  "| ‖g_SGO‖/‖g_TGO‖ | cos(g_TGO, g_SGO) | cos(mean g, mean g of rao_blackwell) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['snr_tgo']:.2f} | {r['snr_sgo']:.2f} | {r['snr_total']:.2f} | "
                         f"{r['snr_debiased_tgo']:.2f} / {r['snr_debiased_sgo']:.2f} / {r['snr_debiased_total']:.2f} | "
                         f"{r['ratio_sgo_tgo']:.2f} | {r['cos_tgo_sgo']:.2f} | {r['cos_mean_with_rao_blackwell']:.2f} |")
        lines.append("")
    floor = 1 / math.sqrt(args.batches)
    lines.append(f"SNR = ‖mean g‖ / sqrt(mean ‖g − mean g‖²) over the rollouts: with {args.batches} rollouts it "
                 f"cannot fall much below 1/sqrt({args.batches}) = {floor:.2f} (the noise left in the mean), so values "
                 "near it mean the signal is not resolved. Debiased SNR = ‖E g‖ / sqrt(tr Cov g) with both estimated "
                 "without bias (‖mean g‖² − tr Ĉov / n, clamped at 0): the SNR of one rollout's gradient. Ratio and "
                 f"cosine are per-rollout means. Student: the toy's seed-{args.seed} student after its warm-up (held-out accuracy "
                 f"{warm_acc:.3f}); importance weights are 1 (fresh rollouts). Wall time {time.time() - t0:.0f} s on "
                 f"{platform.platform()} (torch {torch.__version__}, {args.threads} thread(s)).")
    table = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grad_snr.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "grad_snr.json"), "w") as f:
        json.dump({"batches": args.batches, "seed": args.seed, "warmup_acc": warm_acc, "results": results}, f, indent=1)
    print(table)


if __name__ == "__main__":
    main()
