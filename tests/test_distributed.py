"""Data parallel on ``torch.distributed`` (gloo, CPU, 2 and 3 processes spawned from pytest).

* ``skew_from_rewards(..., process_group=...)``: each rank's α is bitwise the single-process α of the
  concatenated rewards, with uneven per-rank counts, GRPO groups that straddle two or three ranks,
  and ``group_size=None`` (REINFORCE++ normalisation over all ranks).
* ``ddp_num_items``: a linear student head under ``DistributedDataParallel``, each rank with its own
  sequences (different numbers of valid tokens), ``reduction="mean"`` with ``num_items`` from
  ``ddp_num_items`` — the gradient after DDP's averaging equals the single-process gradient of the
  whole batch, and the local count (the default ``num_items``) does not.
* Gradient accumulation: two micro-batches per rank, ``no_sync`` on the first, ``num_items`` from
  ``ddp_num_items`` of both micro-batches' labels for both — the whole batch's gradient again; the
  per-micro-batch count does not give it.

Everything runs in one spawn of 3 processes (a module fixture: the children's start-up — importing
torch — is most of the time): the 3-rank cases on the default group (``process_group=None`` where the
call allows it), the 2-rank cases on ranks 0 and 1 through a ``new_group`` passed explicitly as
``process_group`` (and to DDP). The children use the torch backend and report through files in
``tmp_path``; the run is bounded (``tests/_spawn.py``: the store and collectives time out after
30 s, and the parent kills the children and fails after ``_DEADLINE_S``).
"""
import os

import pytest
import torch
import torch.distributed as dist

from _spawn import spawn

import askd_kernels as ak
from askd_kernels.distributed import ddp_num_items, global_num_items

WORLDS = (2, 3)
_DEADLINE_S = 90.0
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _run_all(rank, world, out_dir):
    """Every distributed case of this file: for each size W in ``WORLDS``, ranks 0..W-1 run them in a
    group of W (the default group when W is the world size, else a new group)."""
    groups = {w: None if w == world else dist.new_group(list(range(w))) for w in WORLDS}  # every rank calls
    out = {}
    for w, group in groups.items():
        if rank < w:
            out[w] = {"skew": _skew_child(rank, w, group),
                      "ga": {name: _ga_child(rank, w, group, name) for name in _LOSSES},
                      "ddp": {name: _ddp_child(rank, w, group, name) for name in _LOSSES}}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def _reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    spawn(_run_all, tmp, max(WORLDS), deadline=_DEADLINE_S)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(max(WORLDS))]


@pytest.fixture(params=WORLDS, ids=lambda w: f"world{w}")
def spawned(request, _reports):
    """``(W, [what each of the W ranks reported])``."""
    world = request.param
    return world, [rep[world] for rep in _reports[:world]]


# ---------------------------------------------------------------- skew_from_rewards over ranks ----

# Per-rank counts 5 and 7 (2 ranks) or 5, 2 and 5 (3 ranks) with groups of 4: the second group
# straddles ranks 0 and 1, or all three ranks. Ties (an all-equal group across the boundaries) and a
# spread of magnitudes exercise every branch.
_REWARDS = torch.tensor([0.3, -1.2, 2.0, 0.7, 1.0, 1.0, 1.0, 1.0, 5.0, -3.0, 0.25, 1e3],
                        dtype=torch.float32)
_SPLITS = {2: (5, 7), 3: (5, 2, 5)}
_DTYPES = [torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool]
_SKEW_CASES = [dict(group_size=4), dict(group_size=2, beta=0.7), dict(group_size=None),
               dict(group_size=12, eps=1e-3), dict(group_size=6)]


def _skew_child(rank, world, group):
    group = dist.group.WORLD if group is None else group
    local = torch.split(_REWARDS, _SPLITS[world])[rank].clone()
    results = [ak.skew_from_rewards(local, process_group=group, **case) for case in _SKEW_CASES]
    # Other dtypes travel as they are (the equal-rewards rule depends on the rewards' precision).
    dtypes = [ak.skew_from_rewards(local.to(d), group_size=4, process_group=group) for d in _DTYPES]
    # A rank with no rewards at all is fine; group_size must divide the *total* count.
    empty = ak.skew_from_rewards(local if rank == 0 else local[:0], group_size=5,
                                 process_group=group)
    try:
        ak.skew_from_rewards(local, group_size=5, process_group=group)
        error = None
    except ValueError as e:
        error = str(e)
    return dict(results=results, dtypes=dtypes, empty=empty, error=error)


def test_skew_from_rewards_over_ranks_is_the_single_process_result(spawned):
    world, reports = spawned
    got = [rep["skew"] for rep in reports]
    split = _SPLITS[world]
    for i, case in enumerate(_SKEW_CASES):
        whole = ak.skew_from_rewards(_REWARDS, **case)
        for r, mine in enumerate(torch.split(whole, split)):
            assert torch.equal(got[r]["results"][i], mine), (case, r)  # bitwise: the same code, same input
    for i, d in enumerate(_DTYPES):
        whole = ak.skew_from_rewards(_REWARDS.to(d), group_size=4)
        for r, mine in enumerate(torch.split(whole, split)):
            assert torch.equal(got[r]["dtypes"][i], mine), (d, r)
    assert torch.equal(got[0]["empty"], ak.skew_from_rewards(_REWARDS[:5], group_size=5))
    assert all(g["empty"].shape == (0,) for g in got[1:])
    for r in range(world):  # 12 rewards in all: every rank raises, after the gathers
        assert got[r]["error"] is not None and "group_size=5" in got[r]["error"]
    # a group of 4 straddles the ranks (4..7: ranks 0 and 1, or 0, 1 and 2)
    bounds = torch.tensor(split).cumsum(0)[:-1]
    assert (bounds % 4 != 0).any() and (world == 2 or ((bounds > 4) & (bounds < 8)).all())


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
# sequences per rank: rank 0 gets 2, rank 1 gets 3 (3 ranks: 1, 3, 1)
_ROWS = {2: (2, 3), 3: (1, 3, 1)}
_LOSSES = ["askd_exact", "askd_rao_blackwell", "jsd"]


def _batch(seed=15, rows=B):
    """The whole batch. Ranks get different numbers of valid tokens (2 ranks: 3 and 16; 3 ranks: 2,
    11 and 6)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g)
    teacher = 2 * torch.randn(rows, T, V, generator=g)
    labels = torch.randint(0, V, (rows, T), generator=g)
    if seed == 15:
        labels[0, 2:] = -100
        labels[1, 1:] = -100
        labels[3, 4:] = -100
    else:       # random valid lengths 0..T
        labels[torch.arange(T) >= torch.randint(0, T + 1, (rows, 1), generator=g)] = -100
    alpha = torch.rand(rows, generator=g) * 0.8 + 0.1
    generated = torch.rand(rows, generator=g) < 0.5
    if seed == 15:
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


def _single_process_grad(name, batch):
    """The gradient of ``"mean"`` over the whole batch in one process."""
    hidden, teacher, labels, alpha, generated = batch
    head = _head()
    _loss(name, head(hidden), teacher, labels, alpha, generated, None).backward()
    return [p.grad for p in head.parameters()]


def _ddp_child(rank, world, group, name):
    hidden, teacher, labels, alpha, generated = (torch.split(x, _ROWS[world])[rank] for x in _batch())
    out = {}
    for how in ("global", "local"):
        model = torch.nn.parallel.DistributedDataParallel(_head(), process_group=group)
        # None: the local count, the wrong one
        n = ddp_num_items(labels, process_group=group) if how == "global" else None
        _loss(name, model(hidden), teacher, labels, alpha, generated, n).backward()
        out[how] = [p.grad.clone() for p in model.module.parameters()]
    return out


def _assert_whole_batch_gradient(got, want, world, how):
    for r in range(world):
        for g, w in zip(got[r][how], want):
            # The same per-token terms summed in another order: the local sums (of each micro-batch)
            # are added by DDP's all_reduce (and by accumulation into .grad) and scaled by W / N then
            # 1 / W instead of 1 / N — fp32 reassociation of a few dozen O(1) terms, a few ulps
            # (≈ 1e-7 relative); 1e-5 / 1e-6 is far below the differences a wrong count makes (checked
            # by each test: the wrong count's gradient is not close even at 1e-3 / 1e-4).
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[r][how][0], got[0][how][0])  # DDP: the same gradient everywhere


@pytest.mark.parametrize("name", _LOSSES)
def test_ddp_mean_over_global_count_is_the_single_process_gradient(spawned, monkeypatch, name):
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    world, reports = spawned
    want = _single_process_grad(name, _batch())
    got = [rep["ddp"][name] for rep in reports]
    _assert_whole_batch_gradient(got, want, world, "global")
    # The default (local) count is wrong under DDP: the test above can tell (rank 0's local count,
    # 3 or 2, is off by a factor ≈ 3 from N / W = 9.5 or 6.3).
    assert not torch.allclose(got[0]["local"][0], want[0], rtol=1e-3, atol=1e-4)


# --------------------------------------------------- gradient accumulation: no_sync, one count per step ----

_GA_ROWS = 10
# rows of each (rank, micro-batch), rank-major; uneven in rows and in valid tokens
_GA_SPLITS = {2: (1, 3, 4, 2), 3: (1, 2, 3, 1, 2, 1)}


def _ga_child(rank, world, group, name):
    parts = [torch.split(x, _GA_SPLITS[world]) for x in _batch(seed=4, rows=_GA_ROWS)]
    micro = [[p[2 * rank + m] for p in parts] for m in range(2)]      # this rank's two micro-batches
    out = {}
    for how in ("global", "per_micro_batch"):
        model = torch.nn.parallel.DistributedDataParallel(_head(), process_group=group)
        # both micro-batches' labels: one count per step
        n = ddp_num_items([mb[2] for mb in micro], process_group=group)
        for m, (hidden, teacher, labels, alpha, generated) in enumerate(micro):
            if how == "per_micro_batch":                 # the wrong one: each micro-batch its own count
                n = ddp_num_items(labels, process_group=group)
            loss = _loss(name, model(hidden), teacher, labels, alpha, generated, n)
            if m == 0:
                with model.no_sync():                     # accumulate locally, no all-reduce
                    loss.backward()
            else:
                loss.backward()                           # the last micro-batch: DDP averages the sum
        out[how] = [p.grad.clone() for p in model.module.parameters()]
    return out


@pytest.mark.parametrize("name", _LOSSES)
def test_ddp_gradient_accumulation_is_the_single_process_gradient(spawned, monkeypatch, name):
    """Two micro-batches per rank, ``no_sync`` on the first, ``ddp_num_items`` of both micro-batches'
    labels for both: DDP's average after the second backward is the gradient of ``"mean"`` over
    every micro-batch of every rank in one process."""
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    world, reports = spawned
    batch = _batch(seed=4, rows=_GA_ROWS)
    counts = [(lab != -100).sum().item() for lab in torch.split(batch[2], _GA_SPLITS[world])]
    assert len(set(counts)) > 2, counts                  # the micro-batches differ in valid tokens
    want = _single_process_grad(name, batch)
    got = [rep["ga"][name] for rep in reports]
    _assert_whole_batch_gradient(got, want, world, "global")
    assert not torch.allclose(got[0]["per_micro_batch"][0], want[0], rtol=1e-3, atol=1e-4)
