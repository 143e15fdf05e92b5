"""pytest-benchmark timings of fwd+bwd: ``pytest bench/test_bench_askd.py`` (tiny CPU cases; the
issue's case when a GPU is present). ``python -m bench`` gives the fuller report."""
import pytest
import torch

from bench.runner import CASES, DTYPES, PROVIDERS, make_inputs


def _loss_fn_or_skip(provider):
    try:
        return PROVIDERS[provider]()
    except (ImportError, AttributeError) as error:
        pytest.skip(f"{provider} unavailable: {error}")


def _step(loss_fn, x, device):
    def step():
        x.student.grad = None
        loss_fn(x).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


@pytest.mark.parametrize("provider", ["eager", "ours"])
@pytest.mark.parametrize("shape", [(2, 64, 2048), (1, 16, 32768)], ids=["B2-T64-V2048", "B1-T16-V32768"])
def test_askd_fwd_bwd_cpu(benchmark, provider, shape):
    loss_fn = _loss_fn_or_skip(provider)
    device = torch.device("cpu")
    x = make_inputs(*shape, torch.float32, device)
    benchmark.extra_info.update(provider=provider, shape=list(shape), dtype="fp32")
    benchmark.pedantic(_step(loss_fn, x, device), rounds=10, warmup_rounds=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the issue's case needs a GPU")
@pytest.mark.parametrize("provider", ["ours", "eager", "compile"])
def test_askd_core_cuda(benchmark, provider):
    loss_fn = _loss_fn_or_skip(provider)
    device = torch.device("cuda")
    case = CASES["askd-core"]["cuda"]
    x = make_inputs(case["batch"], case["seq"], case["vocab"], DTYPES[case["dtype"]], device)
    step = _step(loss_fn, x, device)
    benchmark.extra_info.update(provider=provider, device=torch.cuda.get_device_name(device), **case)
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
