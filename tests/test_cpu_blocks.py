"""The CPU path's blocking (``askd_kernels._torch_math``): which rows a block covers, and that the
results do not depend on the blocks, the worker threads or the logits' strides."""
import os

import pytest
import torch

import askd_kernels as ak
from askd_kernels import _torch_math


def test_row_blocks_skip_ignored_rows_without_gathering(monkeypatch):
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", 40)  # 4 rows of 10 columns per block
    blocks = _torch_math.row_blocks
    assert blocks(None, 10, 10) == [(0, 4, None), (4, 8, None), (8, 10, None)]
    flags = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0]).bool()
    assert blocks(flags, 10, 10) == [(0, 4, None), (8, 9, None)]  # an empty block is dropped, one trimmed
    mostly = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1]).bool()
    (a, b, mask), *rest = blocks(mostly, 8, 10)
    assert (a, b) == (0, 4) and mask.tolist() == [True, False, True, True]  # kept whole, with its mask
    assert rest == [(7, 8, None)]  # a sparse block: its runs
    sparse = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1]).bool()
    assert blocks(sparse, 8, 20) == [(0, 1, None), (3, 4, None), (7, 8, None)]  # 2 rows per block
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", 80)  # 8 rows per block: less than half active
    assert blocks(sparse, 8, 10) == [(0, 1, None), (3, 4, None), (7, 8, None)]
    assert blocks(torch.zeros(8, dtype=torch.bool), 8, 10) == []
    # period: never across a sequence (rows that cannot be viewed as one matrix)
    assert blocks(None, 6, 10, period=3) == [(0, 3, None), (3, 6, None)]


def _step(fn, student, *args, **kwargs):
    student.grad = None
    loss = fn(student, *args, **kwargs)
    loss.backward()
    return loss.detach(), student.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["askd", "fkl", "srkl", "rao_blackwell"])
def test_results_do_not_depend_on_threads_strides_or_blocks(monkeypatch, op, dtype):
    """The same blocks give bitwise the same loss and gradient on one thread or several workers, and
    for logits that are a non-viewable slice (``logits[:, :-1]``, blocks then stop at each
    sequence's end) or a contiguous copy. Other block sizes agree to rounding (torch's vectorised
    loops round a block's tail differently)."""
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    g = torch.Generator().manual_seed(3)
    B, T, V = 4, 9, 300
    full_s = torch.randn(B, T + 1, V, generator=g).to(dtype)
    full_t = torch.randn(B, T + 1, V, generator=g).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100
    labels[2, ::2] = -100
    sgo = torch.tensor([True, False, True, False])

    def run(sliced):
        s = (full_s[:, :-1] if sliced else full_s[:, :-1].contiguous()).detach().requires_grad_()
        t = full_t[:, :-1] if sliced else full_t[:, :-1].contiguous()
        if op in ("askd", "rao_blackwell"):
            est = "rao_blackwell" if op == "rao_blackwell" else "exact"
            return _step(lambda x: ak.askd_loss(x, labels, t, student_generated=sgo, alpha=0.3, estimator=est), s)
        return _step(lambda x: ak.divergence_loss(x, t, labels, kind=op, alpha=0.4), s)

    def same(a, b):
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    saved = torch.get_num_threads()
    try:
        runs = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for chunk in (V, 3 * V, 1 << 20):  # one row, three rows, everything per block
                monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", chunk)
                runs[threads, chunk] = (run(False), run(True))
    finally:
        torch.set_num_threads(saved)
    for chunk in (V, 3 * V, 1 << 20):
        assert same(runs[1, chunk][0], runs[2, chunk][0]) and same(runs[1, chunk][1], runs[2, chunk][1])
    assert same(*runs[1, V])  # one row per block: the same blocks whatever the strides
    reference = runs[1, V][0]
    for contiguous, sliced in runs.values():
        for loss, grad in (contiguous, sliced):
            torch.testing.assert_close(loss, reference[0])
            torch.testing.assert_close(grad, reference[1])
    assert torch.isfinite(reference[1].float()).all()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_worker_threads_survive_a_fork(monkeypatch):
    """A forked child (e.g. a data-loader worker) gets its own worker threads."""
    monkeypatch.setenv("ASKD_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(_torch_math, "CHUNK_ELEMENTS", 512)
    s, t = torch.randn(2, 16, 256), torch.randn(2, 16, 256)
    labels = torch.randint(0, 256, (2, 16))
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = ak.divergence_loss(s, t, labels, kind="jsd").item()
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the same value comes back
            os._exit(0 if ak.divergence_loss(s, t, labels, kind="jsd").item() == expected else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        torch.set_num_threads(saved)
    assert os.WEXITSTATUS(status) == 0
