"""Data parallel on ``torch.distributed`` (gloo, CPU, 2 processes spawned from pytest).

* ``skew_from_rewards(..., process_group=...)``: each rank's α is bitwise the single-process α of the
  concatenated rewards, with uneven per-rank counts, GRPO groups that straddle the ranks, and
  ``group_size=None`` (REINFORCE++ normalisation over all ranks).
* ``ddp_num_items``: a linear student head under ``DistributedDataParallel``, each rank with its own
  sequences (different numbers of valid tokens), ``reduction="mean"`` with ``num_items`` from
  ``ddp_num_items`` — the gradient after DDP's averaging equals the single-process gradient of the
  whole batch, and the local count (the default ``num_items``) does not.

The children use the torch backend and report through files in ``tmp_path``; each run is bounded
(the store and collectives time out, and the parent kills the children after ``_DEADLINE_S``).
"""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import askd_kernels as ak
from askd_kernels.distributed import ddp_num_items, global_num_items

WORLD = 2
_DEADLINE_S = 60.0
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _spawn(fn, tmp_path, *args):
    """Run ``fn(rank, store, out_dir, *args)`` on ``WORLD`` spawned processes; fail after the deadline."""
    store = tmp_path / "store"
    ctx = mp.start_processes(_child, args=(fn, str(store), str(tmp_path)) + args, nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + _DEADLINE_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {_DEADLINE_S} s")


def _child(rank, fn, store, out_dir, *args):
    os.environ["ASKD_KERNELS_BACKEND"] = "torch"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    try:
        fn(rank, out_dir, *args)
        # every rank done before any tears gloo down: a rank that destroys its group while the other
        # still talks to it can abort ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- skew_from_rewards over ranks ----

# Per-rank counts 5 and 7 with groups of 4: the second group straddles ranks 0 and 1. Ties (an
# all-equal group across the boundary) and a spread of magnitudes exercise every branch.
_REWARDS = torch.tensor([0.3, -1.2, 2.0, 0.7, 1.0, 1.0, 1.0, 1.0, 5.0, -3.0, 0.25, 1e3],
                        dtype=torch.float32)
_SPLIT = (5, 7)
_DTYPES = [torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool]
_SKEW_CASES = [dict(group_size=4), dict(group_size=2, beta=0.7), dict(group_size=None),
               dict(group_size=12, eps=1e-3), dict(group_size=6)]


def _skew_child(rank, out_dir):
    local = torch.split(_REWARDS, _SPLIT)[rank].clone()
    results = [ak.skew_from_rewards(local, process_group=dist.group.WORLD, **case) for case in _SKEW_CASES]
    # Other dtypes travel as they are (the equal-rewards rule depends on the rewards' precision).
    dtypes = [ak.skew_from_rewards(local.to(d), group_size=4, process_group=dist.group.WORLD) for d in _DTYPES]
    # A rank with no rewards at all is fine; group_size must divide the *total* count.
    empty = ak.skew_from_rewards(local if rank == 0 else local[:0], group_size=5,
                                 process_group=dist.group.WORLD)
    try:
        ak.skew_from_rewards(local, group_size=5, process_group=dist.group.WORLD)
        error = None
    except ValueError as e:
        error = str(e)
    torch.save(dict(results=results, dtypes=dtypes, empty=empty, error=error), os.path.join(out_dir, f"skew{rank}.pt"))


def test_skew_from_rewards_over_ranks_is_the_single_process_result(tmp_path):
    _spawn(_skew_child, tmp_path)
    got = [torch.load(tmp_path / f"skew{r}.pt") for r in range(WORLD)]
    for i, case in enumerate(_SKEW_CASES):
        whole = ak.skew_from_rewards(_REWARDS, **case)
        for r, mine in enumerate(torch.split(whole, _SPLIT)):
            assert torch.equal(got[r]["results"][i], mine), (case, r)  # bitwise: the same code, same input
    for i, d in enumerate(_DTYPES):
        whole = ak.skew_from_rewards(_REWARDS.to(d), group_size=4)
        for r, mine in enumerate(torch.split(whole, _SPLIT)):
            assert torch.equal(got[r]["dtypes"][i], mine), (d, r)
    assert torch.equal(got[0]["empty"], ak.skew_from_rewards(_REWARDS[:5], group_size=5))
    assert got[1]["empty"].shape == (0,)
    for r in range(WORLD):  # 12 rewards in all: both ranks raise, after the gathers
        assert got[r]["error"] is not None and "group_size=5" in got[r]["error"]


def test_skew_from_rewards_rejects_a_bad_process_group():
    with pytest.raises(TypeError, match="process_group"):
        ak.skew_from_rewards(_REWARDS, group_size=4, process_group="world")
    with pytest.raises(TypeError, match="process_group"):
        global_num_items(torch.zeros(2, 3, dtype=torch.long), process_group=0)


def test_num_items_without_torch_distributed_initialised_is_the_local_count():
    labels = torch.tensor([[1, -100, 2], [-100, -100, 0]])
    assert not dist.is_initialized()
    assert global_num_items(labels).item() == 3
    assert global_num_items([labels, labels[:1]]).item() == 5  # micro-batches of one step
    assert global_num_items(torch.full((2, 2), 7), ignore_index=7).item() == 1  # clamped, as "mean" does
    assert ddp_num_items(labels).dtype == torch.float32 and ddp_num_items(labels).item() == 3.0
    with pytest.raises(TypeError, match="labels"):
        global_num_items(labels.float())
    with pytest.raises(TypeError, match="ignore_index"):
        global_num_items(labels, ignore_index=1.5)


# ------------------------------------------------------------------- DDP: "mean" over all ranks ----

B, T, H, V = 5, 6, 8, 13
_ROWS = (2, 3)  # sequences per rank: rank 0 gets 2, rank 1 gets 3
_LOSSES = ["askd_exact", "askd_rao_blackwell", "jsd"]


def _batch():
    """The whole batch. Ranks get different numbers of valid tokens (rank 0: 3, rank 1: 16)."""
    g = torch.Generator().manual_seed(15)
    hidden = torch.randn(B, T, H, generator=g)
    teacher = 2 * torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2:] = -100
    labels[1, 1:] = -100
    labels[3, 4:] = -100
    alpha = torch.rand(B, generator=g) * 0.8 + 0.1
    generated = torch.tensor([True, False, True, False, True])
    return hidden, teacher, labels, alpha, generated


def _head():
    torch.manual_seed(0)
    return torch.nn.Linear(H, V)


def _loss(name, logits, teacher, labels, alpha, generated, num_items):
    if name == "jsd":
        return ak.divergence_loss(logits, teacher, labels, kind="jsd", num_items=num_items)
    estimator = name.removeprefix("askd_")
    return ak.askd_loss(logits, labels, teacher, student_generated=generated, alpha=alpha,
                        estimator=estimator, num_items=num_items)


def _ddp_child(rank, out_dir, name):
    hidden, teacher, labels, alpha, generated = (torch.split(x, _ROWS)[rank] for x in _batch())
    out = {}
    for how in ("global", "local"):
        model = torch.nn.parallel.DistributedDataParallel(_head())
        n = ddp_num_items(labels) if how == "global" else None  # None: the local count, the wrong one
        _loss(name, model(hidden), teacher, labels, alpha, generated, n).backward()
        out[how] = [p.grad.clone() for p in model.module.parameters()]
    torch.save(out, os.path.join(out_dir, f"ddp{rank}.pt"))


@pytest.mark.parametrize("name", _LOSSES)
def test_ddp_mean_over_global_count_is_the_single_process_gradient(tmp_path, monkeypatch, name):
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    hidden, teacher, labels, alpha, generated = _batch()
    head = _head()
    _loss(name, head(hidden), teacher, labels, alpha, generated, None).backward()  # "mean" on the whole batch
    want = [p.grad for p in head.parameters()]

    _spawn(_ddp_child, tmp_path, name)
    got = [torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)]
    for r in range(WORLD):
        for g, w in zip(got[r]["global"], want):
            # The same per-token terms summed in another order: the local sums are added by DDP's
            # all_reduce and scaled by W / N then 1 / W instead of 1 / N — fp32 reassociation of a
            # few dozen O(1) terms, a few ulps (≈ 1e-7 relative); 1e-5 / 1e-6 is far below the
            # differences a wrong count makes (rank 0's local count, 3, is off by a
            # factor 19 / (2·3) ≈ 3 from N / W = 9.5).
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[r]["global"][0], got[0]["global"][0])  # DDP: the same gradient everywhere
    # The default (local) count is wrong under DDP: the test above can tell.
    assert not torch.allclose(got[0]["local"][0], want[0], rtol=1e-3, atol=1e-4)
