"""What one rank of tests/callbacks/test_distributed_averages.py runs (a module of its own, so that
spawned processes can import it): the EMA callback's buffer broadcast and the BatchNorm pass's
averaging over ranks, on real digits, with the module on the rank's device and the EMA copy on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

from callbacks import EMA, recompute_batch_norm
from lightning_modules import Supervised
from tests.ssl_helpers import SMALL_NET


def statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if "running" in k}


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def run_rank(rank: int, world: int, backend: str, port: int, out: str) -> None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # every rank its own weights, so a broadcast is visible
        module = Supervised(**SMALL_NET, ema_decay=None).to(device)
        images = torch.as_tensor(load_digits().images[rank * 32:(rank + 1) * 32], dtype=torch.float32)
        images = (images.unsqueeze(1) / 16.0).to(device)
        result: dict[str, object] = {}

        # --- EMA(device="cpu"): the swap broadcasts rank 0's buffers of the CPU copy ----------------
        callback = EMA(decay=0.5, device="cpu")
        callback.setup(None, module, "fit")
        module.train()(images)  # this rank's own BatchNorm statistics
        callback.ema.update(module)
        result["ema_before"] = {k: v.clone() for k, v in callback.ema.module.state_dict().items()}
        callback.on_validation_start(None, module)
        result["ema_after"] = {k: v.clone() for k, v in callback.ema.module.state_dict().items()}
        result["swapped_in"] = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        callback.on_validation_end(None, module)

        # --- the BatchNorm pass under DDP: averaged over ranks; refused when the ranks reach other layers
        local, shared = copy.deepcopy(module.net), copy.deepcopy(module.net)
        recompute_batch_norm(local, [images])
        recompute_batch_norm(shared, [images], reduce=_mean_over_ranks)
        result["local"], result["shared"] = statistics(local), statistics(shared)
        pair = nn.ModuleDict({"a": copy.deepcopy(module.net), "b": copy.deepcopy(module.net)})
        result["pair_before"] = statistics(pair)

        def forward(m: nn.Module, inputs: list[torch.Tensor]) -> None:
            m["a"](torch.cat(inputs))
            if rank == 1:
                m["b"](torch.cat(inputs))

        try:
            recompute_batch_norm(pair, [images], forward=forward, reduce=_mean_over_ranks)
            result["pair_error"] = None
        except RuntimeError as err:
            result["pair_error"] = str(err)
        result["pair_after"] = statistics(pair)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
