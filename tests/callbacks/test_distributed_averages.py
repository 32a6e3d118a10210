"""Two real processes: the EMA callback's broadcast of its copy's buffers, with the copy kept on the
CPU (``EMA(device="cpu")``), and the BatchNorm pass's averaging over ranks. gloo runs everywhere;
NCCL, which takes CUDA tensors only, needs two GPUs."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from tests.callbacks.distributed_workers import run_rank
from tests.rank_processes import free_port, run_to_the_end



def _run_two_ranks(backend: str, out) -> list[dict]:
    context = multiprocessing.get_context("spawn")  # spawn: CUDA cannot be used in a forked child
    port = free_port()
    run_to_the_end([context.Process(target=run_rank, args=(r, 2, backend, port, str(out))) for r in range(2)], 300)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("backend", [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")),
])
def test_two_ranks_agree_on_ema_buffers_and_batch_norm_statistics(backend, tmp_path):
    ranks = _run_two_ranks(backend, tmp_path)
    zero, one = ranks
    floating = [k for k, v in zero["ema_before"].items() if v.is_floating_point() and "running" in k]
    params = [k for k in zero["ema_before"] if k.endswith("weight") and "bn" not in k]
    assert floating and params
    # before the swap each rank's copy has its own statistics; after it, rank 0's everywhere
    assert any(not torch.equal(zero["ema_before"][k], one["ema_before"][k]) for k in floating)
    for k in floating:
        assert torch.equal(one["ema_after"][k], zero["ema_before"][k]), k
        assert torch.equal(zero["ema_after"][k], zero["ema_before"][k]), k
        assert torch.equal(one["swapped_in"][k], zero["ema_before"][k]), k
    for k in params:  # parameters are not broadcast: DDP keeps them equal by itself
        assert torch.equal(one["ema_after"][k], one["ema_before"][k]), k

    # the BatchNorm pass: the mean of the ranks' own estimates, the same on both
    for k, v in zero["shared"].items():
        torch.testing.assert_close(v, (zero["local"][k] + one["local"][k]) / 2)
        torch.testing.assert_close(one["shared"][k], v)
    # ranks that reach other layers: a clear error on both (no hang), statistics as they were
    for rank in ranks:
        assert rank["pair_error"] is not None and "b." in rank["pair_error"] and "some processes" in rank["pair_error"]
        assert rank["pair_before"].keys() == rank["pair_after"].keys()
        for k, v in rank["pair_before"].items():
            assert torch.equal(rank["pair_after"][k], v), k
