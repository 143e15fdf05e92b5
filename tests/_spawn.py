"""Run a function on several spawned ``torch.distributed`` processes (gloo, CPU) from a test.

``spawn(fn, tmp_path, world, *args, backend="torch")`` starts ``world`` processes, each initialising
a gloo group through a file store in ``tmp_path`` and calling ``fn(rank, world, out_dir, *args)``
with ``ASKD_KERNELS_BACKEND`` set to ``backend`` (``"triton"`` runs the kernels under the Triton
interpreter: ``TRITON_INTERPRET=1`` is inherited from the parent, set by conftest before the package
is imported). ``fn`` must be a module-level function (it is pickled by name); it reports through
files in ``out_dir``. The run is bounded: the store and the collectives time out after 30 s and the
parent kills the children and fails the test after ``deadline`` seconds.
"""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(fn, tmp_path, world, *args, backend="torch", deadline=90.0):
    store = tmp_path / f"store{time.monotonic_ns()}"
    ctx = mp.start_processes(_child, args=(fn, world, backend, str(store), str(tmp_path)) + args, nprocs=world,
                             join=False, start_method="spawn")
    stop = time.monotonic() + deadline
    while not ctx.join(timeout=1.0):
        if time.monotonic() > stop:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {world} processes did not finish within {deadline} s")


def _child(rank, fn, world, backend, store, out_dir, *args):
    os.environ["ASKD_KERNELS_BACKEND"] = backend
    # As the ``backend`` fixture does: blocks small enough that tiny shapes run the multi-block loops
    # (Triton) and several row blocks (torch).
    if backend == "triton":
        from askd_kernels import _triton_math
        from askd_kernels.askd import triton_coefficients

        _triton_math.MAX_BLOCK, triton_coefficients.BLOCK_T = 32, 16
    else:
        from askd_kernels import _torch_math

        _torch_math.CHUNK_ELEMENTS = 64
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        fn(rank, world, out_dir, *args)
        # every rank done before any tears gloo down (a group destroyed while a peer still talks to
        # it can abort the peer)
        dist.barrier()
    finally:
        dist.destroy_process_group()
