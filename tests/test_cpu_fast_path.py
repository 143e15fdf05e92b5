"""The CPU stages' fused-kernel blocks (``askd_kernels._torch_math``): :func:`log_softmax_into` and
:func:`softmax_into` against the plain formulas they replace, for the block's own (max, log-sum)
pair and for a vocabulary shard given the whole row's pair — the case where the fused softmax's own
normalisation is not the answer."""
import pytest
import torch

from askd_kernels._torch_math import log_softmax_at, log_softmax_into, softmax_into

INF = float("inf")


def _rows(dtype, seed=0, n=6, V=37):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    z[1, 5] = -INF  # a masked column
    z[2] += 1e4  # large logits: the shift is what keeps them exact
    return z.to(dtype)


def _pair(z, inv_tau):
    """The row's (max, log-sum) pair in fp64."""
    z = z.double()
    m = z.amax(-1)
    return m, torch.logsumexp((z - m[:, None]) * inv_tau, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 0.5, 1e-30])
def test_log_softmax_into_is_the_pair_and_log_softmax_at(dtype, tau):
    z = _rows(dtype)
    out = torch.empty(z.shape)
    m, neg_s = torch.empty(z.shape[0]), torch.empty(z.shape[0])
    x = log_softmax_into(out, z, 1.0 / tau, m, neg_s)
    assert x.data_ptr() == out.data_ptr()
    m64, s64 = _pair(z, 1.0 / tau)
    assert torch.equal(m, z.float().amax(-1))  # the raw max, exactly
    torch.testing.assert_close(-neg_s.double(), s64, rtol=0, atol=2e-6 * (1 + s64.abs().max().item()))
    # the log-probabilities are those of the pair, bit for bit (the kernel's (x − max) − log Σ)
    assert torch.equal(x, log_softmax_at(z, m, -neg_s, 1.0 / tau))
    # without the pair's outputs: the same log-probabilities
    assert torch.equal(log_softmax_into(torch.empty(z.shape), z, 1.0 / tau), x)


def test_log_softmax_into_nan_and_infinite_rows():
    z = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0], [INF, 0.0, 1.0], [-INF, -INF, -INF]])
    m, neg_s = torch.empty(4), torch.empty(4)
    x = log_softmax_into(torch.empty(z.shape), z, 1.0, m, neg_s)
    assert torch.isfinite(x[0]).all() and torch.isnan(x[1:]).all() and torch.isnan(neg_s[1:]).all()
    assert torch.isnan(m[1]) and m[2] == INF and m[3] == -INF


def _probabilities(p, r, s):
    """exp((z − m)/τ − s) from softmax_into's (p, r): e^{−s}·p/r."""
    return torch.exp(-s)[:, None] * p / r


@pytest.mark.parametrize("layout", ["wider", "same"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("pair", ["own", "whole_row"])
def test_softmax_into_is_exp_of_the_given_pair(layout, dtype, tau, pair):
    """The shard case: the block holds a few columns of longer rows whose pair (m over the whole
    row, s summing every column) is given. The fused softmax normalises over the block alone; the
    result must still be exp((z − m)/τ − s) of the given pair."""
    full = _rows(dtype, n=6, V=60)
    full[4, :20] -= 200.0  # this row's block lies far below the row's maximum
    full[5, :20] = -INF  # the block is −inf everywhere in this row; the row is not
    block = full[:, :20] if pair == "whole_row" else full[:, :20].contiguous()
    if pair == "own":
        full = block
    m64, s64 = _pair(full, 1.0 / tau)
    if pair == "own":
        block, m64, s64 = block[:5], m64[:5], s64[:5]  # (a row that is −inf everywhere is NaN)
    m, s = m64.float(), s64.float()
    out = torch.empty(block.shape[0], block.shape[1] + (layout == "wider"))
    p, r = softmax_into(out, block, m[:, None], 1.0 / tau)
    got = _probabilities(p, r, s)
    truth = torch.exp((block.double() - m64[:, None]) / tau - s64[:, None])
    naive = torch.exp((block.float() - m[:, None]) / tau - s[:, None])
    assert not torch.isnan(got).any()
    err, err_naive = (got.double() - truth).abs().max().item(), (naive.double() - truth).abs().max().item()
    assert err <= 4 * err_naive + 1e-6, (err, err_naive)
    if pair == "whole_row":
        assert torch.equal(got[5], torch.zeros(20))  # as exp(−inf − m − s): zeros, not NaN
        assert got[4].max() < 1e-30  # a negligible share of its row (e^{−200}: 0 in fp32)


def test_softmax_into_nan_and_infinite_rows():
    z = torch.tensor([[0.0, float("nan"), 1.0], [INF, 0.0, 1.0]])
    m = z.amax(-1, keepdim=True)
    for width in (3, 4):
        p, r = softmax_into(torch.empty(2, width), z, m, 1.0)
        assert torch.isnan(_probabilities(p, r, torch.zeros(2))).all()


def test_softmax_into_tiny_temperature_is_the_argmax():
    z = torch.tensor([[0.0, 3.0, 1.0, 3.0 - 1e-6], [2.0, -1.0, 0.5, 1.0]])
    m = z.amax(-1, keepdim=True)
    for width in (4, 5):
        p, r = softmax_into(torch.empty(2, width), z, m, 1e30)
        got = _probabilities(p, r, torch.zeros(2))
        assert torch.equal(got, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
