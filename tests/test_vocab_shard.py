"""The shared pieces of the vocabulary-parallel paths (``askd_kernels.distributed``): the shard layout
exchange, the shard's labels and the combination of per-shard (max, log-sum) pairs. The losses built
on them are tested end to end in ``tests/test_vocab_parallel_*.py``."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from _spawn import spawn
from askd_kernels import distributed

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_combine_pairs_is_the_log_sum_exp_of_the_whole_row():
    g = torch.Generator().manual_seed(3)
    z = 4 * torch.randn(6, 29, dtype=torch.float64, generator=g)
    z[1, 7:15] = float("-inf")                 # a shard that is −inf throughout this row
    z[2, 3] = float("nan")                     # NaN in one shard: the row is NaN
    tau = 0.6
    cuts = (0, 7, 15, 29)
    pairs = []
    for a, b in zip(cuts, cuts[1:]):
        m = z[:, a:b].amax(1)
        s = torch.logsumexp((z[:, a:b] - m.unsqueeze(1)) / tau, 1)
        pairs.append(torch.stack([m, s], -1))
    whole = distributed.combine_pairs(torch.stack(pairs), 1 / tau)
    lse = whole[:, 0] / tau + whole[:, 1]
    want = torch.logsumexp(z / tau, 1)
    rows = torch.tensor([0, 1, 3, 4, 5])
    torch.testing.assert_close(lse[rows], want[rows], rtol=1e-14, atol=1e-14)
    assert torch.isnan(whole[2]).all()
    assert whole[1, 0] == z[1].nan_to_num(neginf=-1e300).amax()  # the finite shards' max


def test_local_labels_mark_ignored_and_foreign_labels_apart_from_every_column():
    labels = torch.tensor([[-100, 0, 5, 6], [10, 11, 16, 7]])
    local = distributed.local_labels(labels, start=6, width=5, ignore_index=-100)
    assert local.tolist() == [[-1, 5, 5, 0], [4, 5, 5, 1]]
    # a global ignore_index that is another label's local column still means "ignored"
    local = distributed.local_labels(torch.tensor([2, 8, 9]), start=6, width=5, ignore_index=2)
    assert local.tolist() == [-1, 2, 3]


def _layout_child(rank, world, out_dir):
    first = distributed.vocab_shard(10 if rank == 0 else 13, dist.group.WORLD)
    # The same default-group name after a new init, another layout, the same width on rank 0: the
    # remembered layout must not be the old group's.
    dist.barrier()
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store_again", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    second = distributed.vocab_shard(10 if rank == 0 else 4, dist.group.WORLD)
    torch.save((first, second, dist.group.WORLD.group_name), os.path.join(out_dir, f"layout{rank}.pt"))


def test_the_shard_layout_is_exchanged_per_group_not_per_group_name(tmp_path):
    spawn(_layout_child, tmp_path, 2)
    got = [torch.load(tmp_path / f"layout{r}.pt") for r in range(2)]
    assert [g[0] for g in got] == [(0, 23), (10, 23)]
    assert [g[1] for g in got] == [(0, 14), (10, 14)]
    assert got[0][2] == "0"  # the name did come back
