"""``ASKDTrainer`` under ``accelerate launch``: 2 processes, gloo on CPU, against one process.

``tests/_accelerate_askd.py`` (its docstring has the design) trains tiny random Llama students for
one optimizer step on a batch made of two equal shares — on-policy with GRPO groups (``grpo``), with
batch-normalised rewards and two accumulated micro-batches (``reinforce``), and on offline rows
with the ``"sft"`` loss (``sft_offline``) — once launched on 2 processes (each holds one share) and
once as a plain process holding both. Sampling is a function of the prompt and a seed, so the two
runs see the same responses; the gradients after DDP's all-reduce must equal the one-process
gradient of the concatenated batch, which holds only if the ``"mean"`` denominator is the global
count (``num_items_in_batch`` over all ranks, and each rank's loss scaled by ``W``) and the
rewards of ``group_size=1`` are normalised over both ranks. A smoke case trains 6 steps on 2
processes with plain sampling.

Both runs start together in a module fixture (about 20 s of CPU time in all); each is killed with its
process group and the test fails after ``_DEADLINE_S``. ``accelerate launch --cpu`` starts a single
process unless an MPI host file is given, so the launch is ``--multi_gpu --num_processes 2``, which
on a machine without GPUs runs torchrun's 2 processes and gives ``DistributedType.MULTI_CPU`` (gloo)
to the ``use_cpu=True`` Trainer.
"""
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from askd_kernels import skew_from_rewards  # noqa: E402
from askd_kernels.integrations import hf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "_accelerate_askd.py")
EQUIVALENCE = ["grpo", "reinforce", "sft_offline"]
WORLD = 2
_DEADLINE_S = 150.0


def _env(tmp):
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p]),
               ASKD_KERNELS_BACKEND="torch", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp / "hf_home"),   # no accelerate config file of the user's is read
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{"single": {case: file}, "accelerate": {case: [file of rank 0, of rank 1]}}``."""
    tmp = tmp_path_factory.mktemp("accelerate")
    single, dist = tmp / "single", tmp / "accelerate"
    single.mkdir()
    dist.mkdir()
    commands = {
        "single": [sys.executable, SCRIPT, str(single)] + EQUIVALENCE,
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                       "--num_processes", str(WORLD), "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no", "--main_process_port", "0",   # 0: a free port
                       SCRIPT, str(dist)] + EQUIVALENCE + ["smoke"],
    }
    procs = {}
    for name, cmd in commands.items():
        log = open(tmp / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True), log)
    failed = []
    try:
        for name, (proc, log) in procs.items():
            try:
                proc.wait(timeout=_DEADLINE_S)
            except subprocess.TimeoutExpired:
                failed.append(f"{name}: did not finish within {_DEADLINE_S} s")
            else:
                if proc.returncode != 0:
                    log.flush()
                    failed.append(f"{name}: exit {proc.returncode}\n" + (tmp / f"{name}.log").read_text()[-4000:])
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:     # the launcher and the ranks it started: one session, one group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    if failed:
        pytest.fail("\n".join(failed))
    return {"single": {c: torch.load(single / f"{c}_rank0.pt") for c in EQUIVALENCE},
            "accelerate": {c: [torch.load(dist / f"{c}_rank{r}.pt") for r in range(WORLD)]
                           for c in EQUIVALENCE + ["smoke"]}}


@pytest.mark.parametrize("case", EQUIVALENCE)
def test_accelerate_two_processes_give_the_one_process_gradient(runs, case):
    want, got = runs["single"][case], runs["accelerate"][case]
    assert want["world"] == 1 and [g["world"] for g in got] == [WORLD] * WORLD
    assert want["grads"] and set(want["grads"]) == set(got[0]["grads"])
    for rank in range(WORLD):
        for name, w in want["grads"].items():
            # The same per-token terms summed in another order (per-rank sums added by the
            # all-reduce, other micro-batches, forwards over 8 rows instead of 16) and divided by
            # N / W then W instead of N: fp32 reassociation, measured ≤ 1.3 % of this tolerance. A
            # local count is off by the ratio of a rank's tokens to N / W (the rollout check below
            # makes sure they differ), a rank-local α changes every SGO's weight: both fail here.
            torch.testing.assert_close(got[rank]["grads"][name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
            assert torch.equal(got[rank]["grads"][name], got[0]["grads"][name])   # DDP: one gradient everywhere
    # num_items_in_batch is the step's count over both ranks, and the ranks' own counts differ (a
    # local count, or N without the factor W, would give another gradient)
    local = [g["count"]["local"] for g in got]
    assert want["count"] == {"local": sum(local), "num_items_in_batch": sum(local)}
    assert [g["count"]["num_items_in_batch"] for g in got] == [sum(local)] * WORLD and local[0] != local[1], local
    # the logged loss is the mean over the ranks of W x (the rank's sum / N): the whole batch's mean
    assert [g["losses"] for g in got] == [got[0]["losses"]] * WORLD
    assert got[0]["losses"][0] == pytest.approx(want["losses"][0], rel=1e-5)
    if want["rollout"]:
        # each source's rewards and α on ranks 0, 1 are, in rank order, the one-process rollout's, bitwise
        for source in (False, True):
            for key in ("rewards", "alpha", "advantage"):
                mine = torch.cat([g["rollout"][key][g["rollout"]["sgo"] == source] for g in got])
                assert torch.equal(mine, want["rollout"][key][want["rollout"]["sgo"] == source]), (source, key)
    if case == "reinforce":
        # normalising over one rank's SGOs would give another α: the check above can tell
        r0 = got[0]["rollout"]
        local = skew_from_rewards(r0["rewards"][r0["sgo"]])
        assert not torch.allclose(local, r0["alpha"][r0["sgo"]], atol=1e-3)


def test_accelerate_smoke_trains(runs):
    got = runs["accelerate"]["smoke"]
    losses = got[0]["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    change = max((p - p0).abs().max().item() for p, p0 in zip(got[0]["params"], got[0]["init"]))
    assert change > 1e-3, change                 # SGD at 0.1 on gradients of norm ≈ 0.04: the weights move
    for a, b in zip(got[0]["params"], got[1]["params"]):
        assert torch.equal(a, b)                  # the replicas stay identical
    logs = [h for h in got[0]["logs"] if "loss" in h and "train_loss" not in h]
    assert sum("reward_sgo" in h for h in logs) == 3              # a rollout every 2 steps
    assert all(math.isfinite(h["grad_norm_tgo"]) and math.isfinite(h["grad_norm_sgo"]) for h in logs)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_rollout_sampler_shards_a_global_batch_in_rank_order(shuffle, world):
    """The prompts of rank 0, 1, … concatenated are the batches of one process with W·P prompts."""
    n, P, repeat = 20, 3, 2
    single = hf._RolloutBatchSampler(n, P * world, repeat, shuffle, seed=4)
    ranks = [hf._RolloutBatchSampler(n, P, repeat, shuffle, seed=4, rank=r, world=world) for r in range(world)]
    for _ in range(2):          # two passes: the same reshuffle on every rank
        one, per_rank = list(single), [list(s) for s in ranks]
        assert all(len(s) == len(single) == (n // (P * world)) * repeat for s in ranks)
        assert [sum(parts, []) for parts in zip(*per_rank)] == one
        assert sorted(sum(one[::repeat], [])) == sorted(set(sum(one, [])))     # no prompt twice in a pass


def test_a_bad_process_group_is_named():
    head = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="process_group"):
        hf.ASKDDistiller(head, torch.nn.Linear(2, 2), None, lambda p, r: [], eos_token_id=2, pad_token_id=0,
                         process_group="world")
    with pytest.raises(TypeError, match="process_group"):
        hf.assign_skew(torch.tensor([0.0, 1.0]), torch.tensor([False, True]), hf.ASKDConfig(group_size=1),
                       process_group=0)
