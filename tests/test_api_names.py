"""One name for the bias of a linear head, and flat ``[N, H]`` input to ``token_logprobs``.

``askd_loss_from_hidden`` calls it ``lm_head_bias``; ``token_logprobs`` takes the same name, and its
old name ``bias`` still works with a ``DeprecationWarning``.
"""
import inspect
import warnings

import pytest
import torch

import askd_kernels as ak


def _head(seed=0, B=2, T=3, H=4, V=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g),
            torch.randint(0, V, (B, T), generator=g))


def test_token_logprobs_takes_lm_head_bias_and_bias_is_deprecated(backend):
    hidden, weight, bias, labels = _head()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        new = ak.token_logprobs(hidden, weight, labels, lm_head_bias=bias)
    with pytest.warns(DeprecationWarning, match=r"bias.*lm_head_bias"):
        old = ak.token_logprobs(hidden, weight, labels, bias=bias)
    assert torch.equal(new, old)
    assert not torch.equal(new, ak.token_logprobs(hidden, weight, labels))  # the bias is used
    with pytest.raises(TypeError, match=r"lm_head_bias"):
        ak.token_logprobs(hidden, weight, labels, lm_head_bias=bias, bias=bias)


def test_token_logprobs_flat_input(backend):
    """``[N, H]`` with ``[N]`` labels is the ``[1, N, H]`` call, value and gradient; returns ``[N]``."""
    hidden, weight, bias, labels = _head(1)
    hidden, labels = hidden.reshape(6, 4), labels.reshape(6)
    labels[3] = -100
    flat, row = (hidden.clone().requires_grad_() for _ in range(2))
    a = ak.token_logprobs(flat, weight, labels, lm_head_bias=bias)
    b = ak.token_logprobs(row[None], weight, labels[None], lm_head_bias=bias)
    (a * torch.arange(6.0)).sum().backward()
    (b * torch.arange(6.0)).sum().backward()
    assert a.shape == (6,) and torch.equal(a, b.view(6)) and torch.equal(flat.grad, row.grad)
    with pytest.raises(ValueError, match=r"\blabels\b"):
        ak.token_logprobs(hidden, weight, labels[:5])


def test_askd_loss_from_hidden_signature_lists_what_it_takes():
    """help() shows askd_loss's options that askd_loss_from_hidden forwards — not the packed-row
    arguments, which it does not take."""
    params = inspect.signature(ak.askd_loss_from_hidden).parameters
    assert "lm_head_bias" in params and "alpha" in params
    assert not {"cu_seqlens", "position_ids", "max_seqlen"} & set(params)
