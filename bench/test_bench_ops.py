"""pytest-benchmark timings of every op: ``pytest bench/ --benchmark-only``.

* ``test_cpu_*`` — small CPU cases (fp32, one thread, a few seconds in all): ours and eager, forward,
  backward and full step of every op.
* ``test_gpu_*`` — the large cases (bf16, Qwen2's vocabulary, 16k tokens; marked ``gpu``, skipped
  without CUDA): every provider, full step. A provider that runs out of memory, or a third-party one
  that is unavailable (Liger-Kernel: not installed, or no such loss), is skipped with the reason;
  ``askd_kernels`` itself never is: if it fails to import, these tests fail.

``python -m bench`` gives the fuller report (grid, memory, roofline, CSV, plots).
"""
import contextlib

import pytest
import torch

from bench.measure import is_oom
from bench.ops import MODELS, OPS, PROVIDERS, Shape, Unavailable

CPU = torch.device("cpu")
CPU_SHAPE = Shape("toy", batch=2, seq=32, vocab=4096, hidden=64)
GPU_TOKENS = {"askd_loss": 16384, "askd_loss_from_hidden": 16384}  # divergences: 8192 (5 passes per step)


@contextlib.contextmanager
def _one_cpu_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # stable timings on shared machines (no OpenMP barrier stalls)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _loss_fn_or_skip(op, provider, device):
    try:
        return op.loss_fn(provider, device)
    except Unavailable as error:  # only third-party providers raise it
        pytest.skip(f"{provider}: {error}")


def _bench(benchmark, loss_fn, case, mode, device, rounds, warmup):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def clear():
        for leaf in case.leaves:
            leaf.grad = None

    if mode == "backward":
        def setup():
            clear()
            loss = loss_fn(case)
            sync()
            return (loss,), {}

        def target(loss):
            loss.backward()
            sync()

        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup)
        return

    def target():
        clear()
        loss = loss_fn(case)
        if mode == "full":
            loss.backward()
        sync()
        return loss.detach()

    loss = benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("mode", ["full", "forward", "backward"])
@pytest.mark.parametrize("provider", ["ours", "eager"])
@pytest.mark.parametrize("op_id", list(OPS))
def test_cpu(benchmark, op_id, provider, mode):
    op = OPS[op_id]
    loss_fn = _loss_fn_or_skip(op, provider, CPU)
    case = op.make_case(CPU_SHAPE, torch.float32, CPU)
    benchmark.group = f"cpu {op_id} {mode}"
    benchmark.extra_info.update(op=op_id, provider=provider, mode=mode, tokens=CPU_SHAPE.tokens,
                                vocab=CPU_SHAPE.vocab, dtype="fp32", device="cpu")
    with _one_cpu_thread():
        _bench(benchmark, loss_fn, case, mode, CPU, rounds=5, warmup=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the large cases need a GPU")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op_id", list(OPS))
def test_gpu(benchmark, op_id, provider):
    device = torch.device("cuda")
    op = OPS[op_id]
    loss_fn = _loss_fn_or_skip(op, provider, device)
    model = MODELS["qwen2"]
    tokens = GPU_TOKENS.get(op_id, 8192)
    shape = Shape("qwen2", batch=8, seq=tokens // 8, vocab=model.vocab, hidden=model.hidden)
    benchmark.group = f"gpu {op_id} full"
    benchmark.extra_info.update(op=op_id, provider=provider, mode="full", tokens=tokens, vocab=model.vocab,
                                dtype="bf16", device=torch.cuda.get_device_name(device))
    try:
        case = op.make_case(shape, torch.bfloat16, device)
        _bench(benchmark, loss_fn, case, "full", device, rounds=10, warmup=2)
    except Exception as error:  # noqa: BLE001
        if is_oom(error):
            error = None
            torch.cuda.empty_cache()
            pytest.skip(f"{provider}: out of memory at {shape.label()}")
        raise
